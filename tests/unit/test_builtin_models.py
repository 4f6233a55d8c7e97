"""The models built in code: ``builtin:tiny`` (four heads of size 16, tied output projection;
the default, whose baselines docs/benchmarks.md records) and ``builtin:tiny-h64`` (one head of
size 64, which vLLM's CPU attention accepts, and an lm_head of its own, which vLLM's in-place
reload updates): both build, are what a run's ``base_model`` names, pass the preflight, and the
h64 one learns the built-in task."""
from __future__ import annotations

import json

import pytest
import torch
from factories import LEGACY_DEFAULTS, legacy_config

from rlstream.builtin.tiny_model import SHAPES, build_model, save_tiny_model
from rlstream.core.config import BUILTIN_MODEL, BUILTIN_MODELS, Config
from rlstream.core.errors import ConfigError
from rlstream.preflight import preflight
from rlstream.trainer.policy_model import base_model_path

H64 = "builtin:tiny-h64"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def test_every_builtin_model_has_a_shape():
    assert BUILTIN_MODEL in BUILTIN_MODELS and H64 in BUILTIN_MODELS
    assert set(SHAPES) == set(BUILTIN_MODELS)


def test_h64_has_one_head_of_64_and_an_untied_lm_head():
    default, h64 = build_model(0), build_model(0, H64)
    head_dim = {name: m.config.hidden_size // m.config.num_attention_heads for name, m in
                ((BUILTIN_MODEL, default), (H64, h64))}
    assert head_dim == {BUILTIN_MODEL: 16, H64: 64}
    assert default.lm_head.weight is default.model.embed_tokens.weight
    assert h64.lm_head.weight is not h64.model.embed_tokens.weight
    assert not torch.equal(h64.lm_head.weight, h64.model.embed_tokens.weight)
    # The same shapes but the lm_head's, drawn in the same order from the same seed: the same
    # initial values; the lm_head is drawn after them.
    default_params, h64_params = dict(default.named_parameters()), dict(h64.named_parameters())
    assert set(h64_params) == set(default_params) | {"lm_head.weight"}
    for name, p in default_params.items():
        assert torch.equal(p, h64_params[name]), name
    assert 120_000 < sum(p.numel() for p in h64.parameters()) < 140_000
    ids = torch.tensor([[3, 13, 4, 14]])
    with torch.no_grad():
        assert not torch.allclose(default(input_ids=ids).logits, h64(input_ids=ids).logits)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_a_run_builds_the_builtin_model_it_names(tmp_path, name):
    cfg = legacy_config(base_model=name, log_path=str(tmp_path), run_id="m")
    preflight(cfg)
    path = base_model_path(cfg, tmp_path / "run")
    config = json.loads((path / "config.json").read_text())
    assert path == tmp_path / "run" / "base_model"
    assert {k: config[k] for k in SHAPES[name]} == SHAPES[name]
    assert (path / "tokenizer.json").is_file()


def test_save_tiny_model_defaults_to_the_default_model(tmp_path):
    config = json.loads((save_tiny_model(tmp_path / "m") / "config.json").read_text())
    assert (config["num_attention_heads"], config["tie_word_embeddings"]) == (4, True)


def test_an_unknown_builtin_name_is_refused_naming_the_builtin_models(tmp_path):
    cfg = legacy_config(base_model="builtin:tiny-h32", log_path=str(tmp_path), run_id="m")
    with pytest.raises(ConfigError, match=r"neither a built-in model \(builtin:tiny, builtin:tiny-h64\)"):
        preflight(cfg)


@pytest.mark.numeric
def test_h64_learns_the_builtin_task():
    # The same in-process training as the bfloat16 test (tests/unit/test_precision.py), in float32:
    # the exact expected reward over the task's 100 problems, before and after 60 steps. The one
    # 64-wide head wants a smaller step than the default's four: measured 2026-12-07, 0.063 before ->
    # after 60 steps at lr 1e-3 0.755, 2e-3 0.744, 5e-3 0.223 (one head tied: 0.246, 200 steps 0.258);
    # the default model at 5e-3 0.593.
    from test_precision import builtin_run

    before, after = builtin_run("float32", lr=2e-3, model_name=H64)
    assert before < 0.1 and after >= before + 0.3, (before, after)


def test_up_refuses_a_tied_model_for_vllm_and_accepts_an_untied_one(tmp_path):
    """vLLM 0.32's reload leaves a tied lm_head stale (docs/inference-engines.md): refused before
    anything starts, naming the way out; builtin:tiny-h64 and an untied directory pass."""
    def vllm(base_model):
        return Config.model_validate({**LEGACY_DEFAULTS, "base_model": str(base_model), "inference": {
            "backend": "vllm", "base_url": "http://127.0.0.1:8000/v1"}})

    tied = save_tiny_model(tmp_path / "tied", name="builtin:tiny")
    with pytest.raises(ConfigError, match="tie_word_embeddings.*untie the model once"):
        preflight(vllm(tied))
    with pytest.raises(ConfigError, match="untie"):
        preflight(vllm("builtin:tiny"))
    preflight(vllm("builtin:tiny-h64"))
    preflight(vllm(save_tiny_model(tmp_path / "untied", name="builtin:tiny-h64")))
    preflight(Config.model_validate({**LEGACY_DEFAULTS, "base_model": str(tied)}))  # the local backend reloads nothing
