"""Tokens/s of one off-policy distillation step (teacher forward, student forward + backward, loss):
lmdistill's DistillationTrainer (logits path, and fused: true) vs TRL's GKDTrainer (lmbda=0, beta=0, T=1) on the
same models and batch.

trl is not a dependency of lmdistill. Install it beside the project's venv, without its dependencies (the venv
already has what it needs, so torch, transformers and the rest stay exactly as constraints.txt pins them):
    .venv/bin/pip install -q --no-deps --target .venv/trl trl==1.16.0
    PYTHONPATH=.venv/trl .venv/bin/python bench/step_throughput.py
Without trl the TRL rows are skipped. On a GPU: --device cuda --dtype bfloat16 (bf16 teacher weights, the student
under bf16 autocast with float32 master weights), which adds MFU: model FLOPs (6 x student params + 2 x teacher
params, per token) over the GPU's peak dense bf16 FLOP/s.
Prints a table: median seconds per step over repeats, tokens/s, and TRL's time over each method's.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from transformers import TrainingArguments

from devices import device_name, is_cuda, mfu, peak_mb, peak_tflops, reset_peak, sync
from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.models.tiny import tiny_causal_lm, train_tokenizer
from lmdistill.train.trainer import DistillationTrainer

SHAPES = ((1024, (4, 128), (2, 64)), (32000, (4, 256), (2, 256)))  # vocab, teacher (layers, hidden), student's


def batch_of(vocab: int, batch: int, length: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        prompt = length // 4
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def time_steps(trainers: dict, inputs: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each trainer's training_step over `repeats` after one warm-up, the methods taking turns
    within each repeat, so that a load that comes and goes on a shared machine weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for trainer in trainers.values():
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which we bypass to time one step
        trainer.training_step(trainer.model, dict(inputs))  # warm-up
    for _ in range(repeats):
        for name, trainer in trainers.items():
            trainer.model.zero_grad(set_to_none=True)
            sync(device)
            start = time.perf_counter()
            trainer.training_step(trainer.model, dict(inputs))
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_step_memory(trainer, inputs: dict, device: str) -> str:
    """Peak memory (MB) of one more step on CUDA; '-' on CPU, where the process's peak RSS is not one method's."""
    if not is_cuda(device):
        return "-"
    reset_peak(device)
    trainer.training_step(trainer.model, dict(inputs))
    return f"{peak_mb(device):,.0f}"


def _args(cls, device: str, bf16: bool, rows: list, output_dir: str, **kw):
    return cls(output_dir=output_dir, use_cpu=not is_cuda(device), report_to="none", bf16=bf16,
               per_device_train_batch_size=len(rows), remove_unused_columns=False, **kw)


def ours(student, teacher, rows, device: str, bf16: bool, fused: bool):
    objective = DistillObjective([LossTerm("forward_kl", 1.0, {})], temperature=1.0)
    trainer = DistillationTrainer(model=student, args=_args(TrainingArguments, device, bf16, rows, "/tmp/bench_ours"),
                                  train_dataset=rows, data_collator=DistillCollator(0), objective=objective,
                                  teacher=teacher.eval().requires_grad_(False), fused=fused)
    trainer.create_optimizer()
    return trainer


def trl(student, teacher, rows, device: str, bf16: bool, tokenizer):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    args = _args(GKDConfig, device, bf16, rows, "/tmp/bench_trl", gradient_checkpointing=False, lmbda=0.0, beta=0.0,
                 temperature=1.0, max_length=10_000)
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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="teacher weights and the student's autocast dtype (master weights stay float32)")
    ap.add_argument("--vocab", type=int, nargs="+", default=[v for v, _, _ in SHAPES], choices=[v for v, _, _ in SHAPES])
    ap.add_argument("--peak-tflops", type=float, help="the device's peak dense FLOP/s in TFLOP/s, for MFU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bf16 = args.dtype == "bfloat16"
    methods = ["trl", "ours", "ours fused"]
    if importlib.util.find_spec("trl") is None:
        print("trl: skipped (not installed; see this script's --help for the one-line install beside .venv)")
        methods.remove("trl")
    tokenizer = train_tokenizer(["a small corpus for the tokenizer only"] * 4, vocab_size=300)
    name = device_name(args.device)
    peak = peak_tflops(name, args.peak_tflops)
    print(f"batch {args.batch} x {args.length} tokens, median of {args.repeats}, {args.dtype}, {name}, "
          f"{args.threads} threads")
    print("vocab | teacher | student | method | s/step | tokens/s | peak MB | vs TRL | MFU")
    for vocab, (t_layers, t_hidden), (s_layers, s_hidden) in (s for s in SHAPES if s[0] in args.vocab):
        rows = batch_of(vocab, args.batch, args.length)
        inputs = {k: v.to(args.device) for k, v in DistillCollator(0)(rows).items()}
        tokens = args.batch * args.length
        trainers, flops = {}, {}
        for method in methods:
            student = tiny_causal_lm(vocab, s_layers, s_hidden, seed=2, max_position_embeddings=args.length)
            teacher = tiny_causal_lm(vocab, t_layers, t_hidden, seed=1, max_position_embeddings=args.length)
            student.to(args.device)  # float32 master weights
            teacher.to(args.device, torch.bfloat16 if bf16 else torch.float32)
            flops[method] = (6 * sum(p.numel() for p in student.parameters())
                             + 2 * sum(p.numel() for p in teacher.parameters())) * tokens
            trainers[method] = trl(student, teacher, rows, args.device, bf16, tokenizer) if method == "trl" else ours(
                student, teacher, rows, args.device, bf16, fused=method == "ours fused")
        seconds = time_steps(trainers, inputs, args.repeats, args.device)
        for method, trainer in trainers.items():
            memory = peak_step_memory(trainer, inputs, args.device)
            versus = f"{seconds['trl'] / seconds[method]:.2f}x" if "trl" in seconds else "-"
            print(f"{vocab} | {t_layers}x{t_hidden} | {s_layers}x{s_hidden} | {method} | {seconds[method]:.3f} | "
                  f"{tokens / seconds[method]:,.0f} | {memory} | {versus} | "
                  f"{mfu(flops[method], seconds[method], peak)}")

if __name__ == "__main__":
    main()
