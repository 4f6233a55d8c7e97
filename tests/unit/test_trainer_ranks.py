"""The step across two trainer ranks is the one-process step (docs/design.md §15.81 Exact steps
across trainer ranks): FSDP2 over gloo, each rank its share of every minibatch, for every policy
loss and normalisation, the KL term against a sharded reference, TIS and IcePop, micro-batch
budgets, several minibatches (down to one row: a rank with none runs placeholders), streaming,
LoRA and a binding clip: gradients before AdamW, weights after, metrics, to tolerances derived
from the gradients' magnitudes (tests/unit/same_state.py). A minibatch non-finite on one rank
is skipped by both. And the check is not vacuous: with each rank dividing by its own token
count instead of the summed one, the step differs.

One torchrun process group runs every case (tests/unit/ranks_cases.py), so that its start-up
(~15 s: two processes importing torch and transformers) is paid once; its collectives time out
after minutes, which no load on a shared machine reaches. Marked ``numeric``: rerun under every
ATEN_CPU_CAPABILITY (tests/unit/test_cpu_isa.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ranks_cases import BF16, CASES, CLIP, META, NONFINITE, PER_RANK

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900  # the whole group: ~35 s on an idle 2-core machine


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ranks") / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "ranks_cases.py"), str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=HERE.parents[1])
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.mark.numeric
@pytest.mark.parametrize("case", [*CASES, CLIP])
def test_two_ranks_make_the_one_process_step(report, case):
    result = report[case]
    assert result["ok"], result["error"]
    print("largest error / tolerance:", result["worst"])


@pytest.mark.numeric
def test_each_rank_dividing_by_its_own_tokens_is_another_step(report):
    result = report[PER_RANK]
    assert result["ok"], result
    assert result["tokens"][0] != result["tokens"][1]  # the ranks' shares hold unequal token counts


@pytest.mark.numeric
def test_bfloat16_steps_through_fsdp_mixed_precision(report):
    assert report[BF16]["ok"], report[BF16]["error"]


@pytest.mark.numeric
def test_a_minibatch_nonfinite_on_one_rank_is_skipped_by_every_rank(report):
    assert report[NONFINITE]["ok"], report[NONFINITE]["error"]


@pytest.mark.numeric
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_only_rank_0_reads_the_weights(report, lora_rank):
    result = report[f"{META}-lora{lora_rank}"]
    assert result["ok"], result["error"]
