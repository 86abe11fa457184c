"""`lmdistill run --stage test`'s memory estimate against the measured peak of real training steps, within 20%: a model
small enough for the suite but large enough that weights, optimizer state, activations and logits all count."""

import json
import subprocess
import sys

import pytest

from lmdistill.config import config_from_dict
from lmdistill.models.tiny import tiny_causal_lm
from lmdistill.train.summary import memory_estimate

VOCAB, BATCH, LENGTH = 8192, 4, 128
STUDENT = dict(num_layers=4, hidden_size=256, seed=2)
TEACHER = dict(num_layers=4, hidden_size=384, num_heads=6, seed=1)

# Two AdamW steps of a KD stage (forward KL, every position counted) in a fresh process, the weights built inside it as
# a run loads them. Prints the peak of live tensor bytes (torch's profiler records every allocation and free), which
# the estimate models, and for information the peak RSS the steps added: on CPU that also holds what the C allocator
# keeps after frees (and here the profiler's own records).
CHILD = f"""
import json, resource, torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainingArguments
from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.models.tiny import tiny_causal_lm
from lmdistill.train.trainer import DistillationTrainer
torch.set_num_threads(1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    student = tiny_causal_lm({VOCAB}, **{STUDENT!r})
    teacher = tiny_causal_lm({VOCAB}, **{TEACHER!r}).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    rows = [{{"input_ids": (ids := torch.randint(5, {VOCAB}, ({LENGTH},), generator=g).tolist()), "labels": ids}}
            for _ in range({2 * BATCH})]
    args = TrainingArguments(output_dir="out", per_device_train_batch_size={BATCH}, max_steps=2, report_to="none",
                             use_cpu=True, remove_unused_columns=False, save_strategy="no", logging_steps=100)
    DistillationTrainer(model=student, args=args, train_dataset=rows, data_collator=DistillCollator(0),
                        teacher=teacher, objective=DistillObjective([LossTerm("forward_kl", 1.0, {{}})])).train()
live = peak = 0
for when, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                           if e.name() == "[memory]"):
    live += nbytes
    peak = max(peak, live)
rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
print(json.dumps({{"tensors": peak / 2**30, "rss": rss / 2**30}}))
"""


def test_estimate_is_within_20_percent_of_the_measured_peak(tmp_path):
    config = config_from_dict({"data": {"max_length": LENGTH}, "training": {"batch_size": BATCH},
                               "stages": [{"name": "kd", "losses": [{"name": "forward_kl"}]}]})
    estimate = memory_estimate(config, tiny_causal_lm(VOCAB, **TEACHER), tiny_causal_lm(VOCAB, **STUDENT), VOCAB)
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    total = sum(estimate.values())
    assert total == pytest.approx(measured["tensors"], rel=0.2), (estimate, measured)
