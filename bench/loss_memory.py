"""Peak memory and fwd+bwd time of the KD loss at V = 151,936 (Qwen2.5 vocabulary), hidden 896.

Each measurement runs in a fresh subprocess: peak RSS during loss forward + backward minus the RSS once the
inputs exist (hidden states, lm_head weights). All methods compute the same generalized JSD (beta = 0.5, TRL's
default) except (b), which is the plain cross-entropy ordinary fine-tuning pays:
  (a) naive    full [N, V] logits of both models, log-softmax, JSD as TRL's non-Liger GKD path does
  (b) plain CE full student logits + F.cross_entropy
  (c) chunked  full logits, lmdistill `jsd(..., chunk_size)`
  (d) fused    lmdistill `fused_distill_loss` from hidden states + lm_head: full logits never exist
  floor        the four [N, H] x [H, V] matmuls KD from hidden states cannot avoid (both models' logits, the
               student's two gradients), timed alone: the "x floor" column divides each method's time by it
Usage: python bench/loss_memory.py [--tokens 1024 4096] [--methods plain_ce fused floor] [--repeats 3]
       python bench/loss_memory.py --profile fused --tokens 1024    (where the time goes: torch.profiler, top ops)
       python bench/loss_memory.py --device cuda --dtype bfloat16   (a GPU: peak allocated memory over the inputs,
           and MFU, the four-matmul floor's FLOPs, three for plain CE, over the GPU's peak dense bf16 FLOP/s)
Each (method, B*T) runs `--repeats` times, each in a fresh subprocess (peak RSS is per process); the methods take
turns within each repeat, so a load that drifts during the run weighs on all of them alike. The table shows the
medians and each method's time and memory over plain CE's and its time over the floor's; "CPU s" is the process's
CPU time, which a busy machine inflates less than the wall time (a fair comparison with OMP_NUM_THREADS=1).
A child that would pass the memory limit (RLIMIT_AS) reports it instead of taking the machine down.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from devices import device_name, is_cuda, mfu, peak_tflops, sync

VOCAB, HIDDEN = 151_936, 896
METHODS = ("naive", "plain_ce", "chunked", "fused", "floor")


def _peak_mb(device: str) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak RSS (Linux reports KiB)."""
    if is_cuda(device):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _flops(method: str, tokens: int) -> float:
    """The matmul FLOPs each method must do: both models' logits and the student's two gradients (plain CE: the
    student's logits and two gradients)."""
    return (3 if method == "plain_ce" else 4) * 2 * tokens * HIDDEN * VOCAB


def _naive_jsd(student_logits, teacher_logits, labels, beta=0.5):
    """TRL GKDTrainer.generalized_jsd_loss (beta in (0, 1)), written out."""
    import torch
    import torch.nn.functional as F

    s = F.log_softmax(student_logits, dim=-1)
    t = F.log_softmax(teacher_logits, dim=-1)
    beta_t = torch.tensor(beta, dtype=s.dtype)
    mix = torch.logsumexp(torch.stack([s + torch.log(1 - beta_t), t + torch.log(beta_t)]), dim=0)
    jsd = beta * F.kl_div(mix, t, reduction="none", log_target=True) + (1 - beta) * F.kl_div(
        mix, s, reduction="none", log_target=True)
    mask = labels != -100
    return jsd[mask].sum() / mask.sum()


def measure(method: str, tokens: int, device: str = "cpu", dtype_name: str = "float32", profiler=None) -> dict:
    """One method's fwd+bwd on fresh inputs. profiler: a torch.profiler.profile run around the timed work only."""
    import torch
    import torch.nn.functional as F

    from lmdistill.losses import fused_distill_loss, jsd
    from lmdistill.losses.fused import default_chunk_size

    torch.manual_seed(0)
    # Scaled in place: a temporary copy of a weight would raise the baseline peak and hide as much of each method's.
    kw = {"device": device, "dtype": getattr(torch, dtype_name)}
    h_s = torch.randn(tokens, HIDDEN, **kw).mul_(0.5).requires_grad_(True)
    w_s = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, **kw).mul_(0.02))
    h_t, w_t = torch.randn(tokens, HIDDEN, **kw).mul_(0.5), torch.randn(VOCAB, HIDDEN, **kw).mul_(0.02)
    labels = torch.randint(0, VOCAB, (tokens,), device=device)
    # fused picks its chunk from its memory budget; the chunked logits path runs autograd, with smaller chunks
    chunk = default_chunk_size(VOCAB, closed_form=method == "fused")
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() / 2**20 if is_cuda(device) else _peak_mb(device)
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    if profiler is not None:
        profiler.start()
    if method == "floor":
        with torch.no_grad():
            grad_logits = h_s @ w_s.T  # stands in for d loss / d student logits
            h_t @ w_t.T
            grad_logits @ w_s
            grad_logits.T @ h_s
        sync(device)
        if profiler is not None:
            profiler.stop()
        return {"method": method, "tokens": tokens, "peak_mb": _peak_mb(device) - base,
                "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start, "chunk": chunk,
                "flops": _flops(method, tokens), "device_name": device_name(device)}
    if method == "fused":
        loss = fused_distill_loss(h_s, w_s, h_t, w_t, labels, loss="jsd", beta=0.5)
    else:
        student_logits = h_s @ w_s.T  # [N, V] float32
        if method == "plain_ce":
            loss = F.cross_entropy(student_logits, labels)
        else:
            with torch.no_grad():
                teacher_logits = h_t @ w_t.T
            if method == "naive":
                loss = _naive_jsd(student_logits, teacher_logits, labels)
            else:
                loss = jsd(student_logits, teacher_logits, labels, beta=0.5, chunk_size=chunk)
    loss.backward()
    sync(device)
    if profiler is not None:
        profiler.stop()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"method": method, "tokens": tokens, "peak_mb": _peak_mb(device) - base, "seconds": elapsed,
            "flops": _flops(method, tokens), "device_name": device_name(device),
            "cpu_seconds": cpu, "loss": float(loss.detach()), "chunk": chunk}


def _child(method: str, tokens: int, limit_gb: float, device: str = "cpu", dtype: str = "float32") -> dict:
    # CPU: an address-space limit guards the machine. CUDA: no limit (its context reserves far more address space
    # than it uses), and a first run in the same process warms the kernels and the allocator up.
    limit = (f"resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gb * 2**30)}, {int(limit_gb * 2**30)}));"
             if not is_cuda(device) else "")
    run = f"m.measure({method!r}, {tokens}, {device!r}, {dtype!r})"
    code = (f"import json, resource, sys; sys.path.insert(0, 'bench');{limit}"
            f"import loss_memory as m; {run + ';' if is_cuda(device) else ''} print(json.dumps({run}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        reason = "out of memory" if "alloc" in done.stderr.lower() or "memory" in done.stderr.lower() else "failed"
        return {"method": method, "tokens": tokens, "error": f"{reason} (limit {limit_gb:g} GiB)",
                "stderr": done.stderr[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    median = statistics.median_low([r["seconds"] for r in ok])
    return {**next(r for r in ok if r["seconds"] == median), "peak_mb": statistics.median(r["peak_mb"] for r in ok),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in ok), "repeats": len(ok)}


def profile(method: str, tokens: int, top: int = 15) -> None:
    """One measurement in this process under torch.profiler: the ops that took the most time."""
    import torch

    measure(method, min(tokens, 256))  # warm-up: thread pools, first-touch of the allocator
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    seconds = measure(method, tokens, profiler=prof)["seconds"]
    print(f"{method}, B*T={tokens}: {seconds:.2f} s under the profiler")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def _ratio(row: dict, ref: dict | None, key: str) -> str:
    return f"{row[key] / ref[key]:.2f}" if ref and ref[key] > 0 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--mem-limit-gb", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per (method, B*T); the median is shown")
    parser.add_argument("--profile", choices=METHODS[:4], help="profile one method in this process instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="of the hidden states and lm_head weights (the losses compute in float32)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak dense FLOP/s in TFLOP/s, for MFU")
    args = parser.parse_args()
    if args.profile:
        for n in args.tokens:
            profile(args.profile, n)
        return
    runs: dict[tuple[str, int], list[dict]] = {(m, n): [] for n in args.tokens for m in args.methods}
    for n in args.tokens:
        for _ in range(args.repeats):
            for m in args.methods:  # the methods take turns, so drifting load is shared
                runs[m, n].append(_child(m, n, args.mem_limit_gb, args.device, args.dtype))
    rows = [_median(runs[m, n]) for n in args.tokens for m in args.methods]
    name = next((r["device_name"] for r in rows if "device_name" in r), args.device)
    peak = peak_tflops(name, args.peak_tflops) if is_cuda(args.device) else None
    print(f"\nV={VOCAB:,}, hidden={HIDDEN}, {args.dtype}, {name}; JSD(beta=0.5) except plain CE; median of "
          f"{args.repeats}{'; MFU: the matmul FLOPs (4 KD, 3 CE) over the peak' if peak else ''}")
    print(f"{'B*T':>6} {'method':<9} {'peak MB':>9} {'fwd+bwd s':>10} {'CPU s':>7} {'x CE mem':>9} {'x CE time':>10} "
          f"{'x floor':>8} {'CPU x CE':>9} {'CPU x floor':>12} {'MFU':>6}  note")
    for r in rows:
        if "error" in r:
            print(f"{r['tokens']:>6} {r['method']:<9} {'-':>9} {'-':>10} {'-':>7} {'-':>9} {'-':>10} {'-':>8} {'-':>9} "
                  f"{'-':>12} {'-':>6}  not measured: {r['error']}")
            continue
        ref = {m: next((f for f in rows if f["method"] == m and f["tokens"] == r["tokens"] and "error" not in f),
                       None) for m in ("plain_ce", "floor")}
        note = f"chunk {r['chunk']} tokens" if r["method"] in ("chunked", "fused") else ""
        print(f"{r['tokens']:>6} {r['method']:<9} {r['peak_mb']:>9.0f} {r['seconds']:>10.2f} {r['cpu_seconds']:>7.2f} "
              f"{_ratio(r, ref['plain_ce'], 'peak_mb'):>9} {_ratio(r, ref['plain_ce'], 'seconds'):>10} "
              f"{_ratio(r, ref['floor'], 'seconds'):>8} {_ratio(r, ref['plain_ce'], 'cpu_seconds'):>9} "
              f"{_ratio(r, ref['floor'], 'cpu_seconds'):>12} {mfu(r['flops'], r['seconds'], peak):>6}  {note}")
    print("\nratios (targets: fused time <= 1.6x and mem <= 0.5x plain CE; the floor is 4 matmuls to CE's 3)")
    for n in args.tokens:
        got = {r["method"]: r for r in rows if r["tokens"] == n and "error" not in r}
        fused = got.get("fused")
        for ref in ("naive", "plain_ce"):
            if fused and ref in got:
                print(f"  B*T={n}: fused/{ref}: mem {fused['peak_mb'] / got[ref]['peak_mb']:.2f}x, "
                      f"time {fused['seconds'] / got[ref]['seconds']:.2f}x")
        if "chunked" in got and "naive" in got:
            print(f"  B*T={n}: chunked/naive: mem {got['chunked']['peak_mb'] / got['naive']['peak_mb']:.2f}x, "
                  f"time {got['chunked']['seconds'] / got['naive']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
