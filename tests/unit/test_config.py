"""rlstream.core.config: TOML loading, validation errors, env and --set overrides; the CLI's
config errors and its torch-free imports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from factories import rlstream

from rlstream.core.config import BUILTIN_MODEL, Config, load_config, validate_config
from rlstream.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "builtin" / "config.toml"


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith("config error: ") or msg.startswith("dataset error: ")
    assert info.value.exit_code == 2
    return msg


def test_defaults_without_file():
    cfg = load_config(None, environ={})
    assert cfg.base_model == BUILTIN_MODEL
    assert cfg.redis.url is None and cfg.workers.count == 2
    assert cfg.batch_size == 1 * 4  # the cookbook's prompt_groups_per_step x completions_per_prompt


def test_toml_loading(tmp_path):
    p = write(tmp_path, """
run_id = "t1"
completions_per_prompt = 4
prompt_groups_per_step = 3
learning_rate = 5e-4
policy_loss = "dapo"
eps_clip_high = 0.28
[redis]
url = "redis://localhost:6399/1"
[workers]
count = 5
""")
    cfg = load_config(p, environ={})
    assert cfg.run_id == "t1"
    assert cfg.completions_per_prompt == 4 and cfg.prompt_groups_per_step == 3
    assert cfg.batch_size == 12
    assert cfg.learning_rate == 5e-4 and cfg.policy_loss == "dapo" and cfg.eps_clip_high == 0.28
    assert cfg.redis.url == "redis://localhost:6399/1" and cfg.workers.count == 5
    assert cfg.run_dir() == Path("runs") / "t1"


def test_json_loading_round_trips_a_resolved_config(tmp_path):
    cfg = Config(run_id="j1", seed=9, workers={"count": 1})
    p = write(tmp_path, json.dumps(cfg.model_dump(mode="json")), "config.json")
    assert load_config(p, environ={}) == cfg


def test_shipped_example_validates():
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.base_model == "builtin:tiny"
    assert cfg.completions_per_prompt == 8 and cfg.prompt_groups_per_step == 32
    assert cfg.batch_size == 256
    assert cfg.max_steps == 300 and cfg.workers.count == 1 and cfg.redis.url is None
    assert cfg.offpolicy_versions == 1


def test_unknown_field(tmp_path):
    msg = config_error(write(tmp_path, "learning_rat = 0.1\n"), environ={})
    assert "learning_rat" in msg and "Extra inputs are not permitted" in msg


def test_unknown_nested_field(tmp_path):
    msg = config_error(write(tmp_path, "[redis]\nurll = 'redis://x'\n"), environ={})
    assert "redis.urll" in msg


def test_wrong_type(tmp_path):
    msg = config_error(write(tmp_path, 'seed = "abc"\n'), environ={})
    assert msg.startswith("config error: seed:") and "'abc'" in msg


def test_wrong_literal(tmp_path):
    msg = config_error(write(tmp_path, 'policy_loss = "ppo"\n'), environ={})
    assert "policy_loss" in msg and "'ppo'" in msg


def test_misspelt_builtin_name_lists_the_builtins(tmp_path):
    msg = config_error(write(tmp_path, 'advantage = "drgrpo"\n'), environ={})
    assert ("advantage 'drgrpo' must look like 'package.module:function' (or be one of the built-in grpo, dr_grpo)"
            in msg)
    msg = config_error(write(tmp_path, 'reward_fn = "exactmatch"\n'), environ={})
    assert "reward_fn 'exactmatch'" in msg and "exact_match, math_answer" in msg


def test_completions_per_prompt_1(tmp_path):
    msg = config_error(write(tmp_path, "completions_per_prompt = 1\n"), environ={})
    assert msg.startswith("config error: completions_per_prompt:")
    assert "greater than or equal to 2" in msg


def test_several_errors_stay_on_one_line(tmp_path):
    msg = config_error(write(tmp_path, "seed = -1\nepochs = 0\nbogus = 1\n"), environ={})
    assert "seed" in msg and "epochs" in msg and "bogus" in msg


def test_cross_field_check():
    msg = config_error(None, ["completions_per_prompt=8", "max_concurrency_rollout_sample=4"], environ={})
    assert "max_concurrency_rollout_sample must be >= completions_per_prompt" in msg


def test_bad_run_id():
    msg = config_error(None, ["run_id='a:b'"], environ={})
    assert "run_id" in msg and "1-64 characters" in msg


def test_bad_toml_syntax(tmp_path):
    p = write(tmp_path, "seed = = 1\n")
    msg = config_error(p, environ={})
    assert str(p) in msg


def test_bad_json_syntax(tmp_path):
    p = write(tmp_path, "{nope", "config.json")
    assert str(p) in config_error(p, environ={})


def test_missing_file(tmp_path):
    msg = config_error(tmp_path / "nope.toml", environ={})
    assert "nope.toml" in msg and "does not exist" in msg


def test_env_overrides(tmp_path):
    p = write(tmp_path, "seed = 1\n[workers]\ncount = 7\n")
    env = {"RLSTREAM_REDIS_URL": "redis://127.0.0.1:6390/0", "RLSTREAM_WORKERS_COUNT": "3",
           "RLSTREAM_SEED": "5", "UNRELATED": "x", "RLSTREAM_SHUFFLE": "false"}
    cfg = load_config(p, environ=env)
    assert cfg.redis.url == "redis://127.0.0.1:6390/0"
    assert cfg.workers.count == 3
    assert cfg.seed == 5
    assert cfg.shuffle is False


def test_env_override_is_validated():
    msg = config_error(None, environ={"RLSTREAM_WORKERS_COUNT": "many"})
    assert "workers.count" in msg and "'many'" in msg


def test_set_wins_over_env_and_file(tmp_path):
    p = write(tmp_path, "seed = 1\n")
    cfg = load_config(p, ["seed=9", "workers.count=4"],
                      environ={"RLSTREAM_SEED": "5", "RLSTREAM_WORKERS_COUNT": "3"})
    assert cfg.seed == 9 and cfg.workers.count == 4


def test_set_dotted_and_values():
    cfg = load_config(None, ["redis.url=redis://h:1/2", "redis.connect_timeout=2.5", "shuffle=false",
                             "dataset=data/train.jsonl", "run_id=my-run", "max_steps = 10",
                             "eps_clip_high=0.3"], environ={})
    assert cfg.redis.url == "redis://h:1/2" and cfg.redis.connect_timeout == 2.5
    assert cfg.shuffle is False and cfg.dataset == "data/train.jsonl"
    assert cfg.run_id == "my-run" and cfg.max_steps == 10 and cfg.eps_clip_high == 0.3


def test_later_set_wins():
    assert load_config(None, ["seed=1", "seed=2"], environ={}).seed == 2


@pytest.mark.parametrize("item", ["seed", "redis.url"])
def test_malformed_set(item):
    msg = config_error(None, [item], environ={})
    assert repr(item) in msg and "field=value" in msg


def test_set_into_a_non_table():
    msg = config_error(None, ["seed=1", "seed.x=2"], environ={})
    assert "seed" in msg and "not a table" in msg


def test_set_validates_range():
    msg = config_error(None, ["completions_per_prompt=1"], environ={})
    assert msg.startswith("config error: completions_per_prompt:")


def test_numeric_run_id_from_env():
    assert load_config(None, environ={"RLSTREAM_RUN_ID": "42"}).run_id == "42"


def test_batch_size_and_offpolicy_versions():
    cfg = Config(completions_per_prompt=4, prompt_groups_per_step=5, max_head_offpolicy_versions=3)
    assert cfg.batch_size == 20
    assert cfg.offpolicy_versions == 3
    assert cfg.model_copy(update={"synchronous_training": True}).offpolicy_versions == 0
    assert Config(synchronous_training=True, max_head_offpolicy_versions=7).offpolicy_versions == 0
    assert Config(max_head_offpolicy_versions=0).offpolicy_versions == 0


def test_run_dir_needs_run_id():
    with pytest.raises(ConfigError, match="run_id is not set"):
        Config().run_dir()


def test_validate_config_direct():
    assert validate_config({"seed": 3}).seed == 3
    with pytest.raises(ConfigError, match="^config error: workers.count:"):
        validate_config({"workers": {"count": -1}})


# --------------------------------------------------------------------------- the CLI


def test_cli_config_error_exits_2_with_one_line(tmp_path):
    proc = rlstream("up", str(EXAMPLE), "--set", "completions_per_prompt=1", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "completions_per_prompt" in lines[0]
    assert lines[0].startswith("rlstream: config error:")
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_cli_imports_no_torch():
    code = ("import rlstream.cli, rlstream.core.config, rlstream.launcher, rlstream.ops.status, rlstream.ops.audit, "
            "rlstream.producers.producer, rlstream.workers.main, sys; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("line, field", [
    ("seed = true", "seed"), ('seed = "3"', "seed"), ('learning_rate = "1e-3"', "learning_rate"),
    ("synchronous_training = 1", "synchronous_training"), ("[workers]\ncount = true", "workers.count"),
    ('[redis]\nurl = "localhost:6379"', "redis.url"),
])
def test_values_of_the_wrong_type_are_not_coerced(tmp_path, line, field):
    msg = config_error(write(tmp_path, line + "\n"), environ={})
    assert msg.startswith(f"config error: {field}:"), msg


def test_ints_for_floats_and_paths_from_python_are_accepted(tmp_path):
    cfg = load_config(write(tmp_path, "learning_rate = 1\n"), environ={})
    assert cfg.learning_rate == 1.0
    assert Config(log_path=tmp_path, dataset=tmp_path / "d.jsonl").log_path == str(tmp_path)


def test_path_fields_keep_set_text_as_given():
    cfg = load_config(None, ["dataset=2024", "run_id=7"], environ={})
    assert cfg.dataset == "2024" and cfg.run_id == "7"


def test_env_override_names_cover_tables():
    from rlstream.core.config import env_override_names

    names = env_override_names()
    assert {"RLSTREAM_SEED", "RLSTREAM_REDIS_URL", "RLSTREAM_WORKERS_COUNT", "RLSTREAM_INFERENCE_BASE_URL"} <= names
    assert "RLSTREAM_FAULT" not in names and "RLSTREAM_LOG_LEVEL" not in names


def test_cookbook_defaults_are_accepted():
    """The cookbook's Config defaults: max_seq_len=None (no limit), min_group_size=1,
    grad_clip_norm=0.0 (no clipping)."""
    cfg = validate_config({"max_seq_len": None, "min_group_size": 1, "grad_clip_norm": 0.0})
    assert cfg.max_seq_len == 1_048_576 and cfg.min_group_size == 1 and cfg.grad_clip_norm == 0.0


def test_shared_prefix_is_accepted_with_several_trainer_ranks():
    """The built-in config sets it, and docs/scaling-trainer.md runs that config at 2 ranks: the
    ranks take the plain forward instead (optimize.shares_prefixes), nothing is refused."""
    assert load_config(None, ["trainer.shared_prefix=true"], environ={}).trainer.shared_prefix
    builtin = Path(__file__).resolve().parents[2] / "examples" / "builtin" / "config.toml"
    cfg = load_config(builtin, ["trainer.nproc_per_node=2"], environ={})
    assert cfg.trainer.shared_prefix and cfg.trainer.world_size == 2
