"""One KD step at real size: a Qwen2.5-0.5B-shaped student and a Qwen2.5-1.5B-shaped teacher (built from configs,
random weights, vocabulary 151,936, no hub), batch 1 x 512 by default.

Methods, each timed in a fresh subprocess (so that its peak RSS is its own):
  floor       the student's plain SFT step (cross-entropy, backward) plus a teacher forward, both models' logits
              formed at the label positions only (logits_to_keep): what any KD step costs at least
  logits      lmdistill DistillationTrainer.training_step, both models' logits at the label positions (the default)
  fused       the same with fused: true (logits formed chunk by chunk from hidden states and lm_heads)
  cached      fused, against a top-k teacher cache (k=64) instead of a live teacher: no teacher forward
  trl         TRL GKDTrainer.training_step (lmbda=0, beta=0, T=1); skipped with a line when trl is not
              importable (install it beside the venv as step_throughput.py's docstring shows)
Prints s/step (median of --repeats after one warm-up), tokens/s, peak memory (CPU: the subprocess's peak RSS,
Python and torch included; CUDA: peak allocated), the ratio to the floor and, on CUDA, MFU: model FLOPs
(6 x student params x tokens + 2 x teacher params x tokens) over the GPU's peak dense bf16 FLOP/s (--peak-tflops,
or a known device's).

    .venv/bin/python bench/real_size.py [--length 512] [--repeats 3] [--device cuda --dtype bfloat16]
    .venv/bin/python bench/real_size.py --layers 1   # the same widths with 1 layer each: a quick smoke run
At full size on CPU (float32) a step takes minutes and a process up to ~14 GB: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time

from devices import device_name, is_cuda, mfu, peak_mb, peak_tflops, reset_peak, sync

METHODS = ("floor", "logits", "fused", "cached", "trl")
# Widths from the Qwen2.5-0.5B and Qwen2.5-1.5B configs (tied embeddings, grouped-query attention).
STUDENT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
               num_key_value_heads=2)
TEACHER = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2)
VOCAB = 151_936


def _model(shape: dict, layers: int | None, dtype, device, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, rope_theta=1_000_000.0,
                         max_position_embeddings=32_768, **{**shape, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype)


class _TopK:
    """An in-memory top-k teacher cache for the one timed batch (lmdistill.train.trainer.TeacherCacheLookup)."""

    cache_temperature, tail = 1.0, "bucket"

    def __init__(self, teacher, inputs: dict, k: int = 64) -> None:
        import torch

        with torch.no_grad():
            logprobs = teacher(input_ids=inputs["input_ids"]).logits[:, :-1].float().log_softmax(-1)
        top = logprobs.topk(k, dim=-1)
        self.ids, self.logprobs = top.indices, top.values
        self.tails = (1 - top.values.exp().sum(-1)).clamp_min(0)

    def lookup(self, example_ids, labels):
        return self.ids.to(labels.device), self.logprobs.to(labels.device), self.tails.to(labels.device)


def _estimate_mb(method: str, student, teacher, length: int, dtype) -> float | None:
    """`run --stage test`'s memory estimate for this step (batch 1 x length, the logits or fused path), less AdamW's two
    moments: a bench step runs no optimizer step, so they never exist here."""
    import torch

    from lmdistill.config import config_from_dict
    from lmdistill.train.summary import memory_estimate

    if method not in ("logits", "fused"):
        return None
    config = config_from_dict({"data": {"max_length": length}, "training": {"batch_size": 1,
                                                                            "bf16": dtype == torch.bfloat16},
                               "stages": [{"name": "kd", "losses": [{"name": "forward_kl"}],
                                           "fused": method == "fused"}]})
    estimate = sum(memory_estimate(config, teacher, student, VOCAB).values()) * 1024
    return estimate - 2 * 4 * sum(p.numel() for p in student.parameters() if p.requires_grad) / 2**20


def measure(method: str, length: int, repeats: int, layers: int | None, device: str, dtype_name: str) -> dict:
    import torch
    from transformers import TrainingArguments

    from lmdistill.data.collate import DistillCollator
    from lmdistill.losses import DistillObjective, LossTerm
    from lmdistill.train.trainer import DistillationTrainer

    dtype = getattr(torch, dtype_name)
    base_mb = peak_mb(device) if not is_cuda(device) else 0.0  # the process before the models: Python, torch
    student = _model(STUDENT, layers, torch.float32, device, seed=2)  # float32 master weights
    teacher = _model(TEACHER, layers, dtype, device, seed=1).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (length,), generator=g).tolist()
    rows = [{"input_ids": ids, "labels": [-100] * (length // 4) + ids[length // 4:], "example_id": 0}]
    inputs = {k: v.to(device) for k, v in DistillCollator(0)(rows).items()}
    bf16 = dtype == torch.bfloat16
    if method == "floor":
        target = inputs["labels"][:, 1:]
        scored = torch.cat([target != -100, torch.zeros_like(target[:, :1], dtype=torch.bool)], dim=1)

        def step():  # both heads at the scored positions only, as lmdistill's logits path forms them
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
                logits = student(input_ids=inputs["input_ids"], logits_to_keep=scored, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), target[target != -100])
                with torch.no_grad():
                    teacher(input_ids=inputs["input_ids"], logits_to_keep=scored, use_cache=False)
            loss.backward()
    else:
        if method == "trl":
            from datasets import Dataset
            from trl.experimental.gkd import GKDConfig, GKDTrainer

            args = GKDConfig(output_dir="/tmp/bench_real_trl", use_cpu=device == "cpu", report_to="none", bf16=bf16,
                             lmbda=0.0, beta=0.0, temperature=1.0, per_device_train_batch_size=1, max_length=10_000)
            from lmdistill.models.tiny import train_tokenizer

            trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                                 data_collator=DistillCollator(0),  # a tokenizer only because GKDTrainer asks one
                                 processing_class=train_tokenizer(["tokenizer text"] * 4, vocab_size=300))
        else:
            args = TrainingArguments(output_dir="/tmp/bench_real", use_cpu=device == "cpu", report_to="none", bf16=bf16,
                                     per_device_train_batch_size=1, remove_unused_columns=False)
            cache = _TopK(teacher, inputs) if method == "cached" else None
            trainer = DistillationTrainer(model=student, args=args, train_dataset=rows, data_collator=DistillCollator(0),
                                          objective=DistillObjective([LossTerm("forward_kl", 1.0, {})]),
                                          teacher=None if cache else teacher, fused=method != "logits",
                                          teacher_cache=cache)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is bypassed to time one step
        model = trainer.model

        def step():
            trainer.training_step(model, dict(inputs))

    times = []
    reset_peak(device)
    for i in range(repeats + 1):  # the first is a warm-up
        student.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i:
            times.append(time.perf_counter() - start)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    flops = (6 * n_student + (0 if method == "cached" else 2 * n_teacher)) * length
    return {"method": method, "seconds": statistics.median(times), "peak_mb": peak_mb(device), "flops": flops,
            "step_mb": peak_mb(device) - base_mb, "estimate_mb": _estimate_mb(method, student, teacher, length, dtype),
            "device_name": device_name(device)}


def _child(method: str, args: argparse.Namespace) -> dict:
    code = ("import json, sys; sys.path.insert(0, 'bench'); import real_size as r; "
            f"print(json.dumps(r.measure({method!r}, {args.length}, {args.repeats}, {args.layers}, {args.device!r}, "
            f"{args.dtype!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, help="layers of each model (default: the real 24 / 28)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="teacher weights and the student's autocast dtype (master weights stay float32)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--peak-tflops", type=float, help="the device's peak dense FLOP/s in TFLOP/s, for MFU")
    args = ap.parse_args()
    methods = list(args.methods)
    if "trl" in methods and importlib.util.find_spec("trl") is None:
        print("trl: skipped (not installed; see step_throughput.py's docstring for the one-line install)")
        methods.remove("trl")
    rows = [_child(m, args) for m in methods]
    floor = next((r for r in rows if r["method"] == "floor" and "error" not in r), None)
    name = next((r["device_name"] for r in rows if "device_name" in r), args.device)
    peak = peak_tflops(name, args.peak_tflops)
    print(f"\nstudent Qwen2.5-0.5B-shaped, teacher 1.5B-shaped{f' ({args.layers} layers each)' if args.layers else ''}, "
          f"V={VOCAB:,}, batch 1 x {args.length}, {args.dtype}, {name}; median of {args.repeats}")
    print(f"{'method':<8} {'s/step':>8} {'tokens/s':>9} {'peak MB':>9} {'x floor':>8} {'MFU':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<8} not measured: {r['error']}")
            continue
        ratio = f"{r['seconds'] / floor['seconds']:.2f}" if floor else "-"
        print(f"{r['method']:<8} {r['seconds']:>8.2f} {args.length / r['seconds']:>9.0f} {r['peak_mb']:>9.0f} "
              f"{ratio:>8} {mfu(r['flops'], r['seconds'], peak):>6}")
    for r in rows:
        if r.get("estimate_mb"):
            print(f"{r['method']}: run --stage test's estimate {r['estimate_mb']:,.0f} MB (less AdamW's moments: no "
                  f"optimizer step here) vs measured {r['step_mb']:,.0f} MB (peak over the process before the models):"
                  f" {r['estimate_mb'] / r['step_mb']:.2f}x")


if __name__ == "__main__":
    main()
