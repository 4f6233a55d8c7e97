"""The cookbook's Config shape (issue 14; docs/design.md §15.60 Cookbook config sections):
its nested sections, in Python and TOML, move their self-hosted spellings onto rlstream's
fields (one source of truth, conflicts named), hosted-only fields are kept and reported once,
the cookbook's defaults, and ``build_deployment_sampler``."""
from __future__ import annotations

import json
import logging
import re

import pytest

import rlstream
from rlstream import (
    Config,
    ConstantSchedule,
    CosineSchedule,
    DeployConfig,
    GradAccNormalization,
    InfraConfig,
    RolloutSetup,
    TrainerConfig,
    WandBConfig,
    WandbConfig,
    WeightSyncConfig,
    WeightSyncScope,
    WSDSchedule,
    build_deployment_sampler,
    default_constant_schedule,
)
from rlstream.core.config import load_config, validate_config
from rlstream.core.cookbook_config import ignored_settings
from rlstream.core.errors import ConfigError, RunFailed


def async_rl_loop_config(**extra) -> Config:
    """The async_rl_loop page's train.py Config, model names aside."""
    return Config(**{
        "log_path": "./gsm8k_logs", "base_model": "builtin:tiny", "learning_rate": 1.7e-5, "completions_per_prompt": 8,
        "prompt_groups_per_step": 8, "policy_loss": "grpo", "max_head_offpolicy_versions": 4,
        "trainer": TrainerConfig(training_shape_id="accounts/fireworks/trainingShapes/qwen3-8b-128k-h200"),
        "deployment": DeployConfig(tokenizer_model="builtin:tiny"),
        "wandb": WandBConfig(entity="my-team", project="gsm8k-rl"), **extra})


def test_the_async_rl_loop_config_is_accepted_with_its_meaning():
    cfg = async_rl_loop_config()
    assert cfg.tokenizer_model is None  # naming base_model itself = its own tokenizer
    assert (cfg.wandb.entity, cfg.wandb.project) == ("my-team", "gsm8k-rl")
    assert cfg.trainer.training_shape_id.endswith("h200") and cfg.max_head_offpolicy_versions == 4
    assert ignored_settings(cfg) == [
        "trainer.training_shape_id = 'accounts/fireworks/trainingShapes/qwen3-8b-128k-h200' (rlstream trains on "
        "this machine: the trainer's device is trainer.device (or device))"]


def test_the_rl_loop_config_is_accepted_with_its_meaning():
    cfg = Config(
        log_path="./grpo_logs", base_model="builtin:tiny", dataset="/path/to/gsm8k.jsonl", max_rows=200, epochs=1,
        completions_per_prompt=4, max_completion_tokens=1024, temperature=1.0, max_seq_len=4096, policy_loss="grpo",
        infra=InfraConfig(training_shape_id="ts", ref_training_shape_id="ts-forward"),
        deployment=DeployConfig(deployment_id="grpo-serving", tokenizer_model="/models/qwen3-tokenizer"),
        weight_sync=WeightSyncConfig(weight_sync_interval=1, dcp_save_interval=10),
        wandb=WandBConfig(entity="my-team", project="grpo-experiment"))
    assert cfg.tokenizer_model == "/models/qwen3-tokenizer"
    assert (cfg.weight_sync_interval, cfg.dcp_save_interval) == (1, 10)
    assert cfg.weight_sync.weight_sync_interval is None  # moved: one source of truth
    ignored = ignored_settings(cfg)
    assert [line.split(" = ")[0] for line in ignored] == [
        "infra.training_shape_id", "infra.ref_training_shape_id", "deployment.deployment_id"]
    assert "kl_beta > 0" in ignored[1] and "no deployment to provision" in ignored[2]


def test_replicas_timeouts_and_concurrency_map_onto_rlstream_fields():
    cfg = Config(deployment=DeployConfig(replica_count=3, sample_timeout=30.0),
                 weight_sync=WeightSyncConfig(max_concurrent=16))
    assert (cfg.workers.count, cfg.inference.timeout, cfg.max_concurrency_rollout_sample) == (3, 30.0, 16)
    assert Config(weight_sync=WeightSyncConfig(max_concurrent=0)).max_concurrency_rollout_sample is None


def test_the_sections_load_from_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('base_model = "builtin:tiny"\n[deployment]\ntokenizer_model = "builtin:tiny"\nreplica_count = 1\n'
                    'deployment_id = "d"\n[weight_sync]\nweight_sync_interval = 1\ndcp_save_interval = 5\n'
                    'dcp_timeout = 2700\n[infra]\nnode_count = 2\n[trainer]\ntraining_shape_id = "ts"\n'
                    'rdzv_endpoint = "head:29500"\n'
                    '[wandb]\nentity = "e"\nproject = "p"\nrun_name = "n"\n')
    cfg = load_config(path)
    assert (cfg.workers.count, cfg.dcp_save_interval, cfg.tokenizer_model, cfg.wandb.name) == (1, 5, None, "n")
    assert {line.split(" = ")[0] for line in ignored_settings(cfg)} == {
        "trainer.training_shape_id", "deployment.deployment_id", "weight_sync.dcp_timeout"}
    assert cfg.trainer.nnodes == 2 and cfg.trainer.rdzv_endpoint == "head:29500"  # node_count: the trainer's nodes
    # config.json round trip: the same config, with the moved fields left None
    dumped = cfg.model_dump(mode="json")
    assert dumped["weight_sync"]["dcp_save_interval"] is None and dumped["dcp_save_interval"] == 5
    assert validate_config(json.loads(json.dumps(dumped))) == cfg


def test_a_nested_and_a_flat_value_that_disagree_are_an_error_naming_both():
    with pytest.raises(ValueError, match=r"weight_sync.dcp_save_interval = 5 and dcp_save_interval = 3 disagree.*"
                                         r"keep dcp_save_interval \(rlstream's name\)"
                                         r".*drop weight_sync.dcp_save_interval"):
        Config(dcp_save_interval=3, weight_sync=WeightSyncConfig(dcp_save_interval=5))
    with pytest.raises(ConfigError, match=r"deployment.replica_count = 4 and workers.count = 2 disagree"):
        load_config(None, ["workers.count=2", "deployment.replica_count=4"])
    assert Config(dcp_save_interval=5, weight_sync=WeightSyncConfig(dcp_save_interval=5)).dcp_save_interval == 5
    cfg = Config()
    with pytest.raises(ValueError, match="frozen"):  # assigning a table later would skip the move
        cfg.weight_sync = WeightSyncConfig(max_concurrent=16)
    cfg.max_concurrency_rollout_sample = 16  # rlstream's own name is the one to set


def test_cookbook_defaults_strict_on_policy_and_both_wandb_spellings():
    assert Config().max_head_offpolicy_versions == 0 and Config().offpolicy_versions == 0
    with pytest.raises(ValueError, match="weight_sync_interval"):
        Config(weight_sync=WeightSyncConfig(weight_sync_interval=2))  # needs O >= 1 now
    assert WandBConfig is WandbConfig and rlstream.WandBConfig is rlstream.WandbConfig
    assert WandbConfig(run_name="x").name == "x"
    with pytest.raises(ValueError, match="extra"):
        DeployConfig(no_such_field=1)  # a typo is still a typo


def test_up_reports_ignored_hosted_fields_once_before_starting(tmp_path, monkeypatch, caplog):
    from rlstream import launcher

    class NoRedis:
        def __init__(self, path, *args, **kwargs):
            pass

        def start(self):
            raise RunFailed("stop here")

        def stop(self):
            pass

    monkeypatch.setattr(launcher, "preflight", lambda cfg: None)
    monkeypatch.setattr(launcher, "EmbeddedRedis", NoRedis)
    cfg = async_rl_loop_config(run_id="r", log_path=str(tmp_path), infra=InfraConfig(region="us"))
    with caplog.at_level(logging.WARNING, logger="rlstream.launcher"):
        assert launcher.up(cfg) == 1
    reports = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(reports) == 1 and "trainer.training_shape_id" in reports[0] and "infra.region = 'us'" in reports[0]


def test_build_deployment_sampler_is_the_workers_sampler():
    sampler = object()
    setup = RolloutSetup(sampler=sampler, tokenizer=None, sample_kwargs={}, completions_per_prompt=2)
    assert build_deployment_sampler(setup) is sampler
    with pytest.raises(ValueError, match="RolloutSetup your rollout_fn_factory received"):
        build_deployment_sampler({"sampler": sampler})


def test_wandb_gets_the_entity(monkeypatch):
    import sys
    import types

    from rlstream.trainer.wandb_log import make_logger

    calls = {}
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: calls.update(kw)))
    make_logger(Config(run_id="r", wandb=WandBConfig(entity="team", project="p")))
    assert (calls["entity"], calls["project"]) == ("team", "p")


def test_preflight_refuses_wandb_logging_without_wandb(monkeypatch):
    import importlib.util

    from rlstream.preflight import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="wandb is not installed"):
        preflight(Config(wandb=WandBConfig(project="p"), max_completion_tokens=16))


def test_the_rl_loop_example_runs_its_config_through_main(monkeypatch, tmp_path, caplog):
    """examples/cookbook/rl_loop.py (the page's block, imports and names changed) goes through the
    real ``main`` up to the launcher, which reports the hosted fields once."""
    import runpy
    from pathlib import Path

    from rlstream import launcher

    seen = []
    monkeypatch.setattr(launcher, "preflight", lambda cfg: seen.append(cfg))
    monkeypatch.setattr(launcher, "EmbeddedRedis", type("NoRedis", (), {
        "__init__": lambda self, path, *args, **kwargs: None,
        "start": lambda self: (_ for _ in ()).throw(RunFailed("stop")),
        "stop": lambda self: None}))
    monkeypatch.chdir(tmp_path)
    example = Path(__file__).resolve().parents[2] / "examples" / "cookbook" / "rl_loop.py"
    with caplog.at_level(logging.WARNING, logger="rlstream.launcher"), pytest.raises(RunFailed, match="exit 1"):
        runpy.run_path(str(example), run_name="__main__")
    [cfg] = seen
    assert (cfg.weight_sync_interval, cfg.tokenizer_model, cfg.completions_per_prompt) == (1, None, 4)
    assert cfg.dataset.endswith("multi_turn_message_in/data.jsonl") and cfg.max_head_offpolicy_versions == 0
    [report] = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert all(f in report for f in ("infra.training_shape_id", "infra.ref_training_shape_id",
                                     "deployment.deployment_id"))


def test_the_cookbook_tables_are_as_strict_as_rlstreams_own():
    """``core.cookbook_config`` imports nothing of ``core.config`` (the dependency runs one way), so
    its tables carry their own pydantic settings: they must be the ones rlstream's tables have."""
    from rlstream.core.config import ConfigSection
    from rlstream.core.cookbook_config import CookbookSection

    assert CookbookSection.model_config == ConfigSection.model_config
    with pytest.raises(ValueError):
        WeightSyncConfig(dcp_save_interval="5")  # strict: TOML has real types


def test_the_recipes_other_fields_map_onto_rlstreams_or_are_reported():
    """Issue 22 item 7: the real cookbook Config's fields beyond the pages' were unknown fields."""
    cfg = async_rl_loop_config(
        lr_scheduler=CosineSchedule(warmup_steps=10), max_steps=100, pipeline_chunks_per_step=2,
        grad_accumulation_normalization=GradAccNormalization.NUM_SEQUENCES, weight_sync_timeout=300,
        cleanup_on_exit=True, router_replay=True, router_replay_completion_only=True,
        weight_sync_before_training=False, max_seq_len=64,
        trainer=TrainerConfig(training_shape_id="ts", job_id="gsm8k-run", reference_job_id="ref"),
        deployment=DeployConfig(tokenizer_model="builtin:tiny", weight_sync_scope=WeightSyncScope.PER_TRAINER))
    assert (cfg.lr_schedule, cfg.lr_warmup_steps, cfg.normalization) == ("cosine", 10, "sequence_mean")
    assert (cfg.inference.weight_sync_timeout, cfg.run_id) == (300, "gsm8k-run")  # job_id: reattach = same run id
    # two chunks of a 64-sample batch: streaming on, a micro-batch of at most 32 rows of max_seq_len tokens
    assert cfg.trainer.streaming and cfg.trainer.micro_batch_tokens == 32 * 64
    assert (cfg.lr_scheduler, cfg.pipeline_chunks_per_step, cfg.grad_accumulation_normalization,
            cfg.weight_sync_timeout, cfg.trainer.job_id) == (None,) * 5  # moved: one source of truth
    assert [line.split(" = ")[0] for line in ignored_settings(cfg)] == [
        "cleanup_on_exit", "router_replay", "router_replay_completion_only", "weight_sync_before_training",
        "trainer.training_shape_id", "trainer.reference_job_id", "deployment.weight_sync_scope"]
    assert "deployment.weight_sync_scope = 'per_trainer' (weights travel as files" in ignored_settings(cfg)[-1]
    assert validate_config(json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg  # config.json round trip
    none = Config(grad_accumulation_normalization="none", pipeline_chunks_per_step=1,
                  lr_scheduler=default_constant_schedule(), trainer=TrainerConfig(micro_batch_tokens=128))
    assert (none.normalization, none.lr_schedule, none.trainer.streaming) == ("token_mean", "constant", False)
    assert ignored_settings(none) == ["grad_accumulation_normalization = 'none' (gradients are never summed "
                                      "unnormalised: each step's loss is reduced as `normalization` says "
                                      "(token_mean, sequence_mean or token_sum))"]
    kept = Config(pipeline_chunks_per_step=4, trainer=TrainerConfig(micro_batch_tokens=512))
    assert kept.trainer.streaming and kept.trainer.micro_batch_tokens == 512  # a size given is kept


def test_the_recipes_fields_load_from_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('max_steps = 50\npipeline_chunks_per_step = 2\ngrad_accumulation_normalization = '
                    '"num_loss_tokens"\n[lr_scheduler]\ntype = "linear"\nwarmup_steps = 5\n[trainer]\njob_id = "r1"\n')
    cfg = load_config(path)
    assert (cfg.lr_schedule, cfg.lr_warmup_steps, cfg.normalization, cfg.run_id) == ("linear", 5, "token_mean", "r1")
    # ceil(B / 2) rows x max_seq_len, with the cookbook's B = 1 group x 4 completions and rlstream's 2048
    assert cfg.trainer.streaming and cfg.trainer.micro_batch_tokens == 2 * 2048


@pytest.mark.parametrize("given, needle", [
    (dict(lr_scheduler=WSDSchedule()), "type 'wsd' (warmup-stable-decay)"),
    (dict(lr_scheduler=CosineSchedule(min_lr_ratio=0.1)), "min_lr_ratio = 0.1"),
    (dict(lr_scheduler={"type": "linear", "warmup_ratio": 0.1}), "warmup_ratio = 0.1 (give warmup_steps)"),
    (dict(lr_scheduler={"type": "cosine", "decay_ratio": 0.5}), "decay_ratio = 0.5"),
    (dict(lr_scheduler={"type": "step"}), "lr_scheduler: "),
    (dict(lr_scheduler=ConstantSchedule(warmup_steps=3), lr_warmup_steps=2),
     "lr_scheduler.warmup_steps = 3 and lr_warmup_steps = 2 disagree"),
    (dict(pipeline_chunks_per_step=2, trainer=TrainerConfig(streaming=False)),
     "pipeline_chunks_per_step = 2 streams the batch to the trainer in chunks"),
    (dict(pipeline_chunks_per_step=2, ppo_n_minibatches=2), "pipeline_chunks_per_step > 1) needs ppo_n_minibatches"),
    (dict(warm_start_from_adapter="/adapters/a"), "rlstream cannot start LoRA from a PEFT adapter yet"),
    (dict(trainer=TrainerConfig(job_id="r1"), run_id="r2"), "trainer.job_id = 'r1' and run_id = 'r2' disagree"),
])
def test_what_the_recipes_fields_mean_but_rlstream_cannot_do_is_an_error(given, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate_config({"max_steps": 10, **given})


def test_the_porting_page_gives_the_page_no_completion_length_it_does_not_set():
    """Issue 22 item 10: the page's train.py sets no max_completion_tokens, so the porting page
    must not call a completion length "the page's"."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    train = (repo / "examples" / "cookbook" / "train.py").read_text()
    assert "max_completion_tokens" not in train.split("cfg = Config(")[1].split(")\n")[0]
    page = " ".join((repo / "docs" / "rollouts.md").read_text().split())
    assert "16-token completions" not in page and "the page sets no completion length" in page


def test_accelerator_and_node_counts_are_the_trainers_ranks():
    """``accelerator_count`` / ``node_count`` (InfraConfig or TrainerConfig) are the trainer's ranks under
    torchrun: spellings of trainer.nproc_per_node and trainer.nnodes, not ignored settings."""
    cfg = Config(infra=InfraConfig(accelerator_count=4, training_shape_id="ts"))
    assert (cfg.trainer.nproc_per_node, cfg.trainer.nnodes, cfg.trainer.world_size) == (4, 1, 4)
    assert cfg.infra.accelerator_count is None  # moved: one source of truth
    assert [line.split(" = ")[0] for line in ignored_settings(cfg)] == ["infra.training_shape_id"]
    cfg = Config(trainer=TrainerConfig(accelerator_count=2, node_count=3, rdzv_endpoint="head:29500"))
    assert (cfg.trainer.nproc_per_node, cfg.trainer.nnodes, cfg.trainer.world_size) == (2, 3, 6)
    with pytest.raises(ValueError, match="nnodes = 2: set rdzv_endpoint"):
        Config(infra=InfraConfig(node_count=2))
    with pytest.raises(ValueError, match=r"infra.accelerator_count = 2 and trainer.nproc_per_node = 4 disagree"):
        Config(trainer=TrainerConfig(nproc_per_node=4), infra=InfraConfig(accelerator_count=2))
