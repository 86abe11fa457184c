"""Size and speed of a model: parameters, megabytes, greedy generation tokens/s at batch 1 and batch 8."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lmdistill.errors import ModelError
from lmdistill.eval.metrics import eval_mode

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once, as `parameters()` de-duplicates)."""
    return sum(p.numel() for p in model.parameters())


def memory_mb(model: torch.nn.Module) -> float:
    """Megabytes (1e6 bytes) held by the model's parameters and buffers in their current dtypes."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def disk_mb(folder: str | Path) -> float:
    """Megabytes (1e6 bytes) of the weight files (safetensors, bin, pt, gguf) in a saved model folder, so that
    tokenizer and config files do not blur the teacher/student ratio."""
    folder = Path(folder)
    files = [f for f in folder.rglob("*") if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)]
    if not files:
        raise ModelError(f"no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {folder}: pass the folder written "
                         f"by save_pretrained")
    return sum(f.stat().st_size for f in files) / 1e6


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_tokens_per_s(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], batch_size: int,
                            max_new_tokens: int = 32, pad_token_id: int = 0) -> float:
    """Greedy generation throughput in new tokens per second over `prompt_ids`, `batch_size` prompts at a time.

    Every sequence generates exactly `max_new_tokens` (end-of-sequence is suppressed through min_new_tokens), so
    two models given the same prompts do the same amount of work and their numbers compare. One untimed warm-up
    call absorbs lazy initialisation.
    """
    if not prompt_ids:
        raise ModelError("no prompts to time generation with: give at least one speed prompt")
    device = next(model.parameters()).device

    def run(batch: Sequence[Sequence[int]]) -> None:
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad_token_id] * (width - len(ids)) + list(ids) for ids in batch], device=device)
        attention_mask = (torch.arange(width, device=device)[None, :]
                          >= torch.tensor([width - len(ids) for ids in batch], device=device)[:, None]).long()
        model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, num_beams=1,
                       max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=pad_token_id)

    batches = [prompt_ids[i:i + batch_size] for i in range(0, len(prompt_ids), batch_size)]
    with eval_mode(model), torch.no_grad():
        run(batches[0][:1])
        _synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            run(batch)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    return len(prompt_ids) * max_new_tokens / elapsed


def size_and_speed(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]] | None = None,
                   folder: str | Path | None = None, max_new_tokens: int = 32,
                   pad_token_id: int = 0) -> dict[str, float]:
    """Flat size/speed metrics: "params", "memory_mb", "disk_mb" (when `folder` is given) and, when prompts are
    given, "tokens_per_s/batch1" and "tokens_per_s/batch8" on the same prompts (cycled to 8 when fewer)."""
    out: dict[str, float] = {"params": float(count_parameters(model)), "memory_mb": memory_mb(model)}
    if folder is not None:
        out["disk_mb"] = disk_mb(folder)
    if prompt_ids:
        prompts = [prompt_ids[i % len(prompt_ids)] for i in range(max(8, len(prompt_ids)))]
        for batch_size in (1, 8):
            out[f"tokens_per_s/batch{batch_size}"] = generation_tokens_per_s(
                model, prompts, batch_size, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
    return out
