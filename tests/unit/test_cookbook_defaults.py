"""Issue 22 item 3: a cookbook ``Config`` means what it means on the cookbook. rlstream's defaults
are the recipe's for every field the recipe has (``COOKBOOK_DEFAULTS``) but the few kept on
purpose, each with its reason, which ``rlstream up`` / ``rlstream.main`` print once at start;
``kl_beta``'s 0.001 loads a reference model, as the cookbook provisions a reference trainer; a
default the model cannot hold (1024-token completions on the built-in model's 128 positions) is
refused before anything starts; the built-in example keeps its own values
(docs/design.md §15.78 The cookbook's defaults)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from factories import legacy_config

from rlstream.core.config import BUILTIN_MODELS, Config, load_config
from rlstream.core.cookbook_config import COOKBOOK_DEFAULTS, KEPT_DIFFERENCES, _field_default, kept_differences
from rlstream.core.errors import ConfigError, RunFailed
from rlstream.preflight import check_positions, model_positions, preflight

REPO = Path(__file__).resolve().parents[2]
BUILTIN_CONFIG = REPO / "examples" / "builtin" / "config.toml"


def test_every_default_is_the_cookbooks_but_the_kept_ones():
    for dotted, cookbook in COOKBOOK_DEFAULTS.items():
        ours = _field_default(Config, dotted)
        if dotted in KEPT_DIFFERENCES:
            assert ours != cookbook and KEPT_DIFFERENCES[dotted], dotted
        else:
            assert ours == cookbook, (dotted, ours, cookbook)
    assert set(KEPT_DIFFERENCES) <= set(COOKBOOK_DEFAULTS)


def test_the_issue_s_fields_take_the_recipes_values():
    """fw-ai/cookbook training/recipes/rl_loop.py's Config, and the seeds' WeightSyncConfig and gate."""
    cfg = Config()
    assert (cfg.learning_rate, cfg.completions_per_prompt, cfg.prompt_groups_per_step, cfg.max_completion_tokens,
            cfg.kl_beta, cfg.max_rows) == (1e-5, 4, 1, 1024, 0.001, 100)
    assert (cfg.weight_sync_interval, cfg.max_head_offpolicy_versions) == (1, 0)
    assert cfg.dcp_save_interval == 50 and "durability" in KEPT_DIFFERENCES["dcp_save_interval"]  # the cookbook's: 0


def test_kl_beta_s_default_loads_a_reference_from_the_base_weights(r, tmp_path):
    """The cookbook provisions a reference trainer when kl_beta > 0: the trainer here loads a frozen
    copy of the base model; kl_beta = 0 loads none."""
    from rlstream.trainer.trainer import Trainer

    with_ref = Trainer(Config(run_id="ref", log_path=str(tmp_path)), r, tmp_path / "ref")
    assert with_ref.ref_model is not None and not with_ref.ref_model.training
    for p, q in zip(with_ref.model.parameters(), with_ref.ref_model.parameters()):
        assert torch.equal(p, q) and not q.requires_grad
    assert Trainer(Config(run_id="none", log_path=str(tmp_path), kl_beta=0.0), r, tmp_path / "none").ref_model is None


def test_a_default_the_builtin_model_cannot_hold_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError) as info:
        preflight(Config(log_path=str(tmp_path)))
    message = str(info.value)
    for needle in ("max_completion_tokens = 1024 (the cookbook's value)", "max_seq_len = 2048",
                   "past the 128 positions of base_model 'builtin:tiny'", "at most 127", "max_seq_len to at most 128"):
        assert needle in message, message
    for name in BUILTIN_MODELS:
        assert model_positions(name) == 128
        preflight(Config(base_model=name, max_completion_tokens=127))  # a one-token prompt + 127 = 128
        with pytest.raises(ConfigError, match="grow to 129 tokens"):
            preflight(Config(base_model=name, max_completion_tokens=128))
    preflight(Config(max_seq_len=128))  # max_seq_len bounds every sample within the positions: it works
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config, positions", [
    ({"max_position_embeddings": 64}, 64),
    ({"n_positions": 1024}, 1024),  # GPT-2's spelling
    ({"text_config": {"max_position_embeddings": 32}}, 32),  # a multimodal model's text part
    ({"hidden_size": 8}, None),  # not said: not checked
])
def test_an_hf_model_s_positions_come_from_its_config(tmp_path, config, positions):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_positions(str(tmp_path)) == positions
    cfg = Config(base_model=str(tmp_path), max_completion_tokens=100)
    if positions is not None and positions < 101:
        with pytest.raises(ConfigError, match=f"past the {positions} positions"):
            check_positions(cfg, model_positions(str(tmp_path)))
    else:
        check_positions(cfg, model_positions(str(tmp_path)))


def test_the_deliberate_differences_in_effect_are_listed_beside_the_cookbooks():
    lines = kept_differences(Config())
    assert [line.split(" = ")[0] for line in lines] == list(KEPT_DIFFERENCES)
    assert "dcp_save_interval = 50 (cookbook: 0): durability" in lines[3]
    assert "trainer.beta2 = 0.95 (cookbook: 0.999)" in lines[4]
    # a value the config sets itself is its author's: the cookbook's, or another of its own
    mine = Config(dcp_save_interval=0, trainer={"beta2": 0.999}, max_seq_len=16, base_model="builtin:tiny-h64")
    assert [line.split(" = ")[0] for line in kept_differences(mine)] == ["dataset"]


def test_up_prints_them_once_at_start(monkeypatch, caplog, tmp_path):
    from rlstream import launcher

    monkeypatch.setattr(launcher, "EmbeddedRedis", type("NoRedis", (), {
        "__init__": lambda self, path, *args, **kwargs: None,
        "start": lambda self: (_ for _ in ()).throw(RunFailed("stop")),
        "stop": lambda self: None}))
    with caplog.at_level(logging.INFO, logger="rlstream.launcher"):
        assert launcher.up(legacy_config(log_path=str(tmp_path), run_id="kept")) == 1
    [line] = [r.getMessage() for r in caplog.records if "differ from the cookbook's" in r.getMessage()]
    assert "dcp_save_interval = 50 (cookbook: 0)" in line and "trainer.beta2 = 0.95 (cookbook: 0.999)" in line


def test_the_builtin_example_sets_its_own_values_and_trains_as_before():
    """`rlstream up examples/builtin/config.toml` must train as it did with rlstream's old defaults:
    the file sets every field whose default changed, to the values it ran with."""
    cfg = load_config(BUILTIN_CONFIG, environ={})
    assert (cfg.learning_rate, cfg.completions_per_prompt, cfg.prompt_groups_per_step, cfg.max_completion_tokens,
            cfg.kl_beta, cfg.max_rows, cfg.max_seq_len) == (2e-3, 8, 32, 1, 0.0, 20_000, 16)
    assert (cfg.dcp_save_interval, cfg.trainer.beta2, cfg.weight_sync_interval) == (50, 0.95, 1)  # unchanged
    preflight(cfg)
