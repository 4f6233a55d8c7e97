"""How a trainer of several ranks is started (rlstream/torchrun.py, docs/scaling-trainer.md): the
torchrun command for one node and for several, ``rlstream trainer`` / ``rlstream replay``
becoming torchrun's agent (exec) with the same arguments on every rank, and what preflight
refuses before any rank starts."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from rlstream import cli, torchrun
from rlstream.core.config import Config, TrainerConfig, load_config
from rlstream.core.errors import ConfigError
from rlstream.preflight import check_ranks

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_one_node_is_a_standalone_rendezvous():
    trainer = TrainerConfig(nproc_per_node=4)
    assert torchrun.command(trainer, "r1", ["trainer", "runs/r1/config.json"]) == [
        *TORCHRUN, "--standalone", "--nnodes", "1", "--nproc-per-node", "4", "--max-restarts", "0",
        "-m", "rlstream.cli", "trainer", "runs/r1/config.json"]


def test_several_nodes_meet_at_the_endpoint_named_by_the_run():
    trainer = TrainerConfig(nproc_per_node=8, nnodes=2, rdzv_endpoint="head.cluster:29400")
    assert torchrun.torchrun_args(trainer, "r1") == [
        "--nnodes", "2", "--nproc-per-node", "8", "--max-restarts", "0", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "head.cluster:29400", "--rdzv-id", "r1"]
    assert torchrun.torchrun_args(trainer.model_copy(update={"rdzv_id": "job7"}), "r1")[-1] == "job7"
    static = TrainerConfig(nproc_per_node=8, nnodes=2, rdzv_endpoint="10.0.0.5:29500", node_rank=1)
    assert torchrun.torchrun_args(static, "r1")[-6:] == [
        "--node-rank", "1", "--master-addr", "10.0.0.5", "--master-port", "29500"]


def test_rank_settings_are_checked_by_the_config():
    with pytest.raises(ValueError, match=r"nnodes = 2: set rdzv_endpoint"):
        TrainerConfig(nnodes=2)
    with pytest.raises(ValueError, match=r"node_rank = 2 is not below nnodes = 2"):
        TrainerConfig(nnodes=2, rdzv_endpoint="h:1", node_rank=2)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        TrainerConfig(nnodes=2, rdzv_endpoint="no-port")
    with pytest.raises(ValueError, match="nproc_per_node"):
        TrainerConfig(nproc_per_node=0)
    assert load_config(None, ["trainer.nproc_per_node=2"]).trainer.world_size == 2
    assert Config().trainer.world_size == 1 and Config().trainer.collective_timeout == 600.0


def test_ranks_are_recognised_by_torchruns_environment(monkeypatch):
    for name in torchrun.RANK_ENV + ("RANK",):
        monkeypatch.delenv(name, raising=False)
    assert not torchrun.under_torchrun() and torchrun.rank() == 0
    assert torchrun.launches(TrainerConfig(nproc_per_node=2)) and not torchrun.launches(TrainerConfig())
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("RANK", "1")
    assert torchrun.under_torchrun() and torchrun.rank() == 1
    assert not torchrun.launches(TrainerConfig(nproc_per_node=2))  # a rank never launches ranks again


@pytest.fixture
def execs(monkeypatch):
    """``os.execve`` recorded instead of run: what ``rlstream trainer`` / ``replay`` would become."""
    for name in torchrun.RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def execve(path, argv, env):
        calls.append((path, argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(torchrun.os, "execve", execve)
    return calls


def test_rlstream_trainer_becomes_torchrun_with_its_own_arguments(tmp_path, execs):
    config = tmp_path / "c.toml"
    config.write_text('run_id = "r1"\n')
    with pytest.raises(SystemExit):
        cli.run(["trainer", str(config), "--set", "trainer.nproc_per_node=2", "--set", "seed=3"])
    (path, argv, env), = execs
    assert path == sys.executable and env["PYTHONSAFEPATH"] == "1"
    assert argv == [*TORCHRUN, "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", "0",
                    "-m", "rlstream.cli", "trainer", str(config), "--set", "trainer.nproc_per_node=2",
                    "--set", "seed=3"]


def test_rlstream_replay_gives_every_rank_one_run_id(tmp_path, execs):
    config = tmp_path / "c.toml"
    config.write_text("[trainer]\nnproc_per_node = 2\n")
    with pytest.raises(SystemExit):
        cli.run(["replay", "src", str(config)])
    (_, argv, _), = execs
    assert argv[argv.index("rlstream.cli") + 1:-1] == ["replay", "src", str(config), "--run-id"]
    assert argv[-1]  # chosen once, here: each rank would otherwise draw its own


def test_one_rank_runs_in_this_process(tmp_path, execs, monkeypatch):
    monkeypatch.setattr(cli, "_connect", lambda cfg: (_ for _ in ()).throw(SystemExit(3)))
    config = tmp_path / "c.toml"
    config.write_text('run_id = "r1"\n')
    with pytest.raises(SystemExit) as exited:
        cli.run(["trainer", str(config)])
    assert exited.value.code == 3 and execs == []


def test_preflight_refuses_what_ranks_cannot_do(tmp_path, monkeypatch, caplog):
    two = {"trainer": TrainerConfig(nproc_per_node=2, device="cpu")}
    check_ranks(Config(**two))
    check_ranks(Config(evaluation_fn="m:f"))  # one rank: anything goes
    with pytest.raises(ConfigError, match="evaluation_fn with 2 trainer ranks"):
        check_ranks(Config(**two, evaluation_fn="m:f"))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"nproc_per_node = 2 ranks on a node with 0 GPU\(s\)"):
        check_ranks(Config(trainer=TrainerConfig(nproc_per_node=2, device="cuda")))
    with pytest.raises(ConfigError, match="names one GPU"):
        check_ranks(Config(trainer=TrainerConfig(nproc_per_node=2, device="cuda:1")))
    check_ranks(Config(trainer=TrainerConfig(nproc_per_node=2), device="auto"))  # no GPU: CPU ranks
    legacy = tmp_path / "step-3"
    legacy.mkdir()
    (legacy / "train_state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="single-process format"):
        check_ranks(Config(**two, init_from_checkpoint=str(legacy)))
    # fewer rows than ranks: exact (placeholders), only said
    with caplog.at_level(logging.WARNING, logger="rlstream.preflight"):
        check_ranks(Config(trainer=TrainerConfig(nproc_per_node=4, device="cpu"), prompt_groups_per_step=1,
                           completions_per_prompt=2))
    assert "a minibatch of 2 rows on 4 ranks: 2 rank(s) train placeholders only" in caplog.text


def test_a_rank_ends_with_its_code_its_output_flushed_and_no_finalization(tmp_path):
    """docs/design.md §15.90 A rank ends without the interpreter's finalization: ``end_rank``
    exits with the code, after the log and stdout are flushed, and runs no ``atexit`` handler
    (finalization, where gloo's worker threads abort a rank, is skipped with it)."""
    log_file, atexit_ran = tmp_path / "rank.log", tmp_path / "atexit-ran"
    script = (
        "import atexit, logging, pathlib, sys\n"
        "from rlstream.torchrun import end_rank\n"
        f"logging.basicConfig(filename={str(log_file)!r})\n"
        f"atexit.register(pathlib.Path({str(atexit_ran)!r}).touch)\n"
        "logging.getLogger('rank').warning('last words')\n"
        "sys.stdout.write('no newline, still buffered')\n"
        "end_rank(7)\n"
        "raise SystemExit('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "no newline, still buffered"
    assert "last words" in log_file.read_text()
    assert not atexit_ran.exists()


@pytest.fixture
def ended(monkeypatch) -> list[int]:
    """The codes ``end_rank`` was called with (recorded, then a SystemExit in place of ``os._exit``),
    in a process that is not a rank until the test sets torchrun's environment (``as_rank``)."""
    for name in torchrun.RANK_ENV:
        monkeypatch.delenv(name, raising=False)
    codes: list[int] = []

    def end_rank(code):
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(torchrun, "end_rank", end_rank)
    return codes


def as_rank(monkeypatch) -> None:
    for name in torchrun.RANK_ENV:
        monkeypatch.setenv(name, "1")


@pytest.mark.parametrize("rank", [True, False])
def test_the_entry_point_ends_a_rank_through_end_rank(monkeypatch, ended, rank):
    if rank:
        as_rank(monkeypatch)
    monkeypatch.setattr(cli, "run", lambda: 4)
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint()
    assert exited.value.code == 4 and ended == ([4] if rank else [])


@pytest.mark.parametrize("raised, ends", [(RuntimeError("boom"), [1]), (SystemExit(0), [])])
def test_a_rank_that_raises_ends_with_1_its_traceback_printed(monkeypatch, capsys, ended, raised, ends):
    """An error no handler turns into a code: the traceback, then exit 1 without finalization (where it
    could end as SIGABRT, -6); a SystemExit (``--help``) keeps its own code."""
    as_rank(monkeypatch)

    def run():
        raise raised

    monkeypatch.setattr(cli, "run", run)
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint()
    assert ended == ends and exited.value.code == (1 if ends else 0)
    assert ("RuntimeError: boom" in capsys.readouterr().err) == bool(ends)
