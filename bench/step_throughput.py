"""Tokens/s of one off-policy distillation step (teacher forward, student forward + backward, loss):
lmdistill's DistillationTrainer vs TRL's GKDTrainer (lmbda=0, beta=0, T=1) on the same models and batch.

trl is not a dependency of lmdistill: run this from a separate venv that has both, e.g.
    python3 -m venv /tmp/trlbench && /tmp/trlbench/bin/pip install -c constraints.txt torch==2.13.0+cpu
    /tmp/trlbench/bin/pip install -c constraints.txt trl==1.16.0 -e .
    /tmp/trlbench/bin/python bench/step_throughput.py
Prints a table: median seconds per step over repeats, tokens/s, and ours / TRL.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from datasets import Dataset
from transformers import TrainingArguments

from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.models.tiny import tiny_causal_lm, train_tokenizer
from lmdistill.train.trainer import DistillationTrainer


def batch_of(vocab: int, batch: int, length: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        prompt = length // 4
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def time_steps(trainer, inputs: dict, repeats: int) -> float:
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we bypass to time one step
    trainer.training_step(model, dict(inputs))  # warm-up
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        trainer.training_step(model, dict(inputs))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(student, teacher, rows, tokenizer, fused: bool):
    args = TrainingArguments(output_dir="/tmp/bench_ours", use_cpu=True, report_to="none", per_device_train_batch_size=len(rows),
                             remove_unused_columns=False)
    objective = DistillObjective([LossTerm("forward_kl", 1.0, {})], temperature=1.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=rows, data_collator=DistillCollator(0),
                                  objective=objective, teacher=teacher.eval().requires_grad_(False), fused=fused)
    trainer.create_optimizer()
    return trainer


def trl(student, teacher, rows, tokenizer):
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = GKDConfig(output_dir="/tmp/bench_trl", use_cpu=True, report_to="none", bf16=False,
                     gradient_checkpointing=False, lmbda=0.0, beta=0.0, temperature=1.0,
                     per_device_train_batch_size=len(rows), max_length=10_000)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                         data_collator=DistillCollator(0), processing_class=tokenizer)
    trainer.create_optimizer()
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = train_tokenizer(["a small corpus for the tokenizer only"] * 4, vocab_size=300)
    print(f"batch {args.batch} x {args.length} tokens, median of {args.repeats}, {args.threads} threads")
    print("vocab | teacher | student | method | s/step | tokens/s | vs TRL")
    for vocab, (t_layers, t_hidden), (s_layers, s_hidden) in ((1024, (4, 128), (2, 64)), (32000, (4, 256), (2, 256))):
        rows = batch_of(vocab, args.batch, args.length)
        inputs = DistillCollator(0)(rows)
        tokens = args.batch * args.length
        results = {}
        for name in ("trl", "ours", "ours fused"):
            student = tiny_causal_lm(vocab, s_layers, s_hidden, seed=2, max_position_embeddings=args.length)
            teacher = tiny_causal_lm(vocab, t_layers, t_hidden, seed=1, max_position_embeddings=args.length)
            trainer = trl(student, teacher, rows, tokenizer) if name == "trl" else ours(
                student, teacher, rows, tokenizer, fused=name == "ours fused")
            results[name] = time_steps(trainer, inputs, args.repeats)
        for name, seconds in results.items():
            print(f"{vocab} | {t_layers}x{t_hidden} | {s_layers}x{s_hidden} | {name} | {seconds:.3f} | "
                  f"{tokens / seconds:,.0f} | {results['trl'] / seconds:.2f}x")


if __name__ == "__main__":
    main()
