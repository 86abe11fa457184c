"""Two processes whose batches the rows do not fill evenly: the last round is completed with filler rows that count
nothing, so one epoch counts every row's tokens exactly once over both processes (accelerate alone would read rows
from the start again to fill it, and train them twice), and an evaluation each eval row once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.data.collate import DistillCollator
from lmdistill.train.trainer import DistillationTrainer
from rounds_probe import OBJECTIVE, examples

PROBE = Path(__file__).with_name("rounds_probe.py")
ROWS, BATCH = 10, 2  # 2 processes x 2 rows a round: the last round holds 2 rows and 2 fillers
EVAL_ROWS = 5  # the last eval round: 1 row and 3 fillers (one process's batch all fillers)


@pytest.mark.multiprocess
def test_an_epoch_and_an_evaluation_count_every_row_once_over_the_processes(tmp_path, student_dir, teacher_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(PROBE),
           str(student_dir), str(teacher_dir), str(tmp_path), str(ROWS), str(BATCH), str(EVAL_ROWS)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # the same steps on both processes

    want = {ex["example_id"]: sum(label != -100 for label in ex["labels"][1:]) for ex in examples(ROWS)}
    got = dict.fromkeys(want, 0)
    for seen in ranks[0] + ranks[1]:
        for example_id, counted in zip(seen["ids"], seen["counted"], strict=True):
            got[example_id] += counted
    assert got == want
    reads = sorted(i for seen in ranks[0] + ranks[1] for i in seen["ids"])
    assert len(reads) == 12 and set(reads) == set(want)  # two rows read again as fillers, counting nothing
    # the loss's denominator: each step's tokens over both processes, fillers left out
    for step0, step1 in zip(*ranks, strict=True):
        assert step0["num_items"] == step1["num_items"] == sum(step0["counted"]) + sum(step1["counted"])

    # Evaluated before training: the eval_loss of one process reading all eval rows in one batch.
    args = TrainingArguments(output_dir=str(tmp_path / "single"), per_device_eval_batch_size=EVAL_ROWS,
                             report_to="none", use_cpu=True, remove_unused_columns=False)
    single = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args,
                                 data_collator=DistillCollator(0), objective=OBJECTIVE,
                                 teacher=AutoModelForCausalLM.from_pretrained(teacher_dir).eval())
    want = single.evaluate(examples(EVAL_ROWS))
    for r in (0, 1):
        got = json.loads((tmp_path / f"eval{r}.json").read_text())
        assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)
        assert got["eval_samples_per_second"] == pytest.approx(EVAL_ROWS / got["eval_runtime"], rel=0.05)
