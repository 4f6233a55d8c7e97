"""Checks ``rlstream up`` runs before it starts anything: every problem a child process
would hit on its first line is reported here as one line (exit 2) instead."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from rlstream.core.config import (
    ADVANTAGE_METHODS,
    BUILTIN_MODEL,
    BUILTIN_MODELS,
    BUILTIN_POSITIONS,
    BUILTIN_REWARDS,
    TOKEN_ADVANTAGE_METHODS,
    Config,
)
from rlstream.core.cookbook_config import COOKBOOK_DEFAULTS
from rlstream.core.errors import ConfigError
from rlstream.core.imports import import_object

log = logging.getLogger(__name__)


def ties_word_embeddings(base_model: str) -> bool:
    """Whether the model's lm_head is its input embedding matrix (transformers' default is tied)."""
    if base_model in BUILTIN_MODELS:
        return base_model == BUILTIN_MODEL  # builtin:tiny-h64 is untied for vLLM
    from transformers import AutoConfig  # late: only a vllm run pays for the import

    # The class's default applies when config.json omits the key (tied for most, not for all)
    config = AutoConfig.from_pretrained(base_model)
    return bool(getattr(config, "tie_word_embeddings", False) or
                getattr(config.get_text_config(), "tie_word_embeddings", False))


# config.json keys that hold a model's context length, in the order transformers' configs use them
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_positions(base_model: str) -> int | None:
    """The positions ``base_model`` was built for (its config.json's context length; the
    built-in models' 128); None when its config does not say."""
    if base_model in BUILTIN_MODELS:
        return BUILTIN_POSITIONS
    try:
        config = json.loads((Path(base_model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") if isinstance(config, dict) else None):
        for key in POSITION_KEYS if isinstance(section, dict) else ():
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_positions(cfg: Config, positions: int | None) -> None:
    """A sequence is at most ``max_seq_len`` tokens, and at most the prompt (one token at
    least) plus ``max_completion_tokens``: the shorter bound must fit the model's positions, or
    the run would sample and train past them (the cookbook's default of 1024 completion tokens
    on the built-in model's 128, say). Raised here, before anything starts, with what to set."""
    if positions is None:
        return
    longest = min(cfg.max_seq_len, 1 + cfg.max_completion_tokens)
    if longest <= positions:
        return
    cookbook = " (the cookbook's value)" if cfg.max_completion_tokens == COOKBOOK_DEFAULTS["max_completion_tokens"] \
        else ""
    raise ConfigError(
        f"config error: max_completion_tokens = {cfg.max_completion_tokens}{cookbook} and max_seq_len = "
        f"{cfg.max_seq_len} let "
        f"a sequence grow to {longest} tokens, past the {positions} positions of base_model {cfg.base_model!r}: set "
        f"max_completion_tokens to at most {positions - 1} (minus your prompts' length), or max_seq_len to at most "
        f"{positions}" + (" (the built-in task answers in one token: max_completion_tokens = 1, as "
                          "examples/builtin/config.toml)" if cfg.base_model in BUILTIN_MODELS and cfg.dataset is None
                          else ""))


def check_ranks(cfg: Config) -> None:
    """A trainer of several ranks (``trainer.nproc_per_node * trainer.nnodes > 1``): what cannot
    work is refused here, before torchrun starts any rank, with the reason (docs/scaling-trainer.md).
    A batch with fewer rows than ranks is not refused: a rank without a row runs placeholders (an
    empty forward and backward), and the step is still exact (docs/design.md §15.81 Exact steps
    across trainer ranks); it only wastes that rank, which is logged."""
    trainer = cfg.trainer
    world = trainer.world_size
    if world == 1:
        return
    if cfg.advantage == "igpo":
        raise ConfigError(f"config error: advantage = \"igpo\" with {world} trainer ranks: its information gains "
                          "come from forwards of the policy in the trainer, and a sharded policy's forward is a "
                          "collective of every rank, which only rank 0 (which scores the groups) would run; not "
                          "supported yet: set trainer.nproc_per_node = 1 (and nnodes = 1)")
    if cfg.evaluation_fn is not None:
        raise ConfigError(f"config error: evaluation_fn with {world} trainer ranks: evaluation samples from the "
                          "policy in the trainer, and a sharded policy's forward is a collective of every rank, which "
                          "only rank 0 would run; not supported yet: set trainer.nproc_per_node = 1 (and nnodes = 1) "
                          "or evaluate the published weights outside the run")
    if cfg.trainer_device.startswith("cuda") or cfg.trainer_device == "auto":
        import torch  # late: only a run of several ranks on a GPU node pays for the import

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cfg.trainer_device != "auto" and ":" in cfg.trainer_device:
            raise ConfigError(f"config error: trainer.device = {cfg.trainer_device!r} names one GPU, but "
                              f"{trainer.nproc_per_node} ranks per node each take the GPU of their LOCAL_RANK: set "
                              "trainer.device = \"cuda\"")
        if trainer.nproc_per_node > gpus and (gpus or cfg.trainer_device != "auto"):
            raise ConfigError(f"config error: trainer.nproc_per_node = {trainer.nproc_per_node} ranks on a node "
                              f"with {gpus} GPU(s): each rank takes one GPU; set it to at most {gpus} (or train "
                              "on the CPU with trainer.device = \"cpu\")")
    held = Path(cfg.init_from_checkpoint or ".")
    if cfg.init_from_checkpoint and not (held / "dcp").is_dir() and (held / "train_state.pt").is_file():
        raise ConfigError(f"config error: init_from_checkpoint {cfg.init_from_checkpoint!r} is in the "
                          "single-process format (train_state.pt), which loads into one unsharded trainer only: run "
                          "one rank from it until it writes a checkpoint (dcp/), then start from that one")
    rows = cfg.batch_size // cfg.ppo_n_minibatches
    if rows < world:
        log.warning("trainer: a minibatch of %d rows on %d ranks: %d rank(s) train placeholders only (exact, but "
                    "they only add their cost)", rows, world, world - rows)


def preflight(cfg: Config) -> None:
    specs = {"rollout_fn_factory": cfg.rollout_fn_factory, "dynamic_filter_fn": cfg.dynamic_filter_fn,
             "evaluation_fn": cfg.evaluation_fn}
    if cfg.reward_fn not in BUILTIN_REWARDS:
        specs["reward_fn"] = cfg.reward_fn
    if cfg.advantage not in ADVANTAGE_METHODS + TOKEN_ADVANTAGE_METHODS:
        specs["advantage"] = cfg.advantage
    for name, spec in specs.items():
        if spec:
            try:
                import_object(spec, name)
            except ValueError as exc:
                raise ConfigError(f"config error: {exc}") from None
    if cfg.dataset is not None:
        from rlstream.producers.datasets import load_rows

        load_rows(cfg)  # raises with file:line on the first bad row; logs how many rows max_rows leaves out
    for name in ("tokenizer_model", "reference_model"):
        path = getattr(cfg, name)
        if path and not Path(path).is_dir():
            raise ConfigError(f"config error: {name}: {path!r} is not a directory")
    if cfg.base_model not in BUILTIN_MODELS and not (Path(cfg.base_model) / "config.json").is_file():
        raise ConfigError(f"config error: base_model: {cfg.base_model!r} is neither a built-in model "
                          f"({', '.join(BUILTIN_MODELS)}) nor an HF model directory (no config.json)")
    check_positions(cfg, model_positions(cfg.base_model))
    if cfg.inference.backend == "vllm" and ties_word_embeddings(cfg.base_model):
        raise ConfigError(f"config error: base_model {cfg.base_model!r} ties its output projection to its input "
                          "embeddings (tie_word_embeddings), and vLLM 0.32's in-place reload leaves a tied lm_head at "
                          "the weights the server started with, so samples after the first sync would come from mixed "
                          "weights: untie the model once before the run (docs/inference-engines.md, 'Tied word "
                          "embeddings and vLLM 0.32'; builtin:tiny-h64 is untied)")
    if cfg.wandb.project and importlib.util.find_spec("wandb") is None:  # the trainer would fail at its start
        raise ConfigError(f"config error: wandb.project = {cfg.wandb.project!r} but wandb is not installed: "
                          "`pip install wandb`, or drop the wandb section (RLSTREAM_WANDB_PROJECT='' turns it off)")
    # dcp/: the checkpoint format since docs/design.md §15.80 Checkpoints with torch.distributed.checkpoint;
    # train_state.pt: the one before
    held = Path(cfg.init_from_checkpoint or ".")
    if cfg.init_from_checkpoint and not ((held / "dcp" / ".metadata").is_file() or (held / "train_state.pt").is_file()):
        raise ConfigError(f"config error: init_from_checkpoint: {cfg.init_from_checkpoint!r} is not a checkpoint "
                          "directory (neither dcp/ nor train_state.pt)")
    check_ranks(cfg)
