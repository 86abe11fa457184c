"""What the benches share about the device they time on: synchronising before reading a clock, peak memory, and
MFU (model FLOPs per second over the device's peak dense bf16 FLOP/s). Device-generic: on CPU the syncs do nothing,
peak memory is the process's peak RSS and there is no MFU."""

from __future__ import annotations

import resource

import torch

# Peak dense bf16 tensor-core TFLOP/s (no sparsity), from the vendors' datasheets; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def is_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def sync(device: str) -> None:
    """Wait for the device's queued work, so that a wall clock read after it covers that work."""
    if is_cuda(device):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float:
    """CUDA: the peak memory torch allocated on the device; CPU: the process's peak RSS (Linux reports KiB)."""
    if is_cuda(device):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if is_cuda(device) else "cpu"


def peak_tflops(name: str, override: float | None = None) -> float | None:
    """The device's peak dense bf16 TFLOP/s: `override`, else a known GPU's, else None (no MFU printed)."""
    return override or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def mfu(flops: float, seconds: float, peak: float | None) -> str:
    """FLOPs / seconds over the peak, as a percentage; '-' without a peak (CPU, an unknown GPU)."""
    return f"{flops / seconds / (peak * 1e12):.1%}" if peak and seconds > 0 else "-"
