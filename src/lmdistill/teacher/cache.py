"""`cache-teacher`: run the teacher once over every source and store its top-k log-probs in checksummed shards.

Layout of a cache folder:
    manifest.json                       see manifest.py (identity of the cache + the list of complete shards)
    shard-SSS-IIIII.safetensors         examples [I*S, (I+1)*S) of source number SSS, tensors:
        row_ids   int64 [m]             row id of each example
        offsets   int64 [m + 1]         example j owns counted tokens offsets[j] .. offsets[j+1]
        ids       uint8 [ceil(n*k*b/8)] top-k token ids, b = ceil(log2 V) bits each (packing.py)
        logprobs  fp16|bf16|fp32 [n, k] log softmax(logits / T) at those ids, most likely first
        tail      float32 [n]           probability mass outside the top k
        pairs     int32 [n, 2]          only across tokenizers (see below)
The n rows are the counted tokens (as the trainer shifts and masks them). When the teacher's tokenizer differs
from the student's, the teacher reads its own tokens of each example and the rows are the example's aligned pairs
instead (lmdistill.train.cross_tokenizer: the last token of each byte-aligned span on both sides, kept where the
student's label mask counts the next token): `pairs` holds each row's (student position, teacher position), and ids
are the teacher's own (V its vocabulary). The manifest then records the teacher's tokenizer and the alignment rule.
A shard is written to a temp name, fsynced, checksummed and renamed; only then does the manifest list it. A run
that dies leaves at most a temp file, which the next run deletes before continuing after the last listed shard.
Several processes (torchrun) split the shards between them and list theirs in per-process manifest parts that the
main process merges (manifest.py); the folder they leave is the one a single process writes.
With several teachers (`teachers:`) the log-probs are those of the target a stage trains on: their weighted mixture
at the capture temperature, or for a routed source its teacher's alone; the manifest lists the teachers.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from lmdistill.config import TeacherCacheSettings
from lmdistill.data.collate import CrossTokenizerCollator, DistillCollator
from lmdistill.errors import CacheError
from lmdistill.teacher.capture import capture_paired_topk, capture_topk
from lmdistill.teacher.endpoint import EndpointTeacher
from lmdistill.teacher.ensemble import TeacherEnsemble
from lmdistill.teacher.fingerprint import examples_fingerprint, sha256_file
from lmdistill.teacher.manifest import (CachedTeacher, Manifest, ShardEntry, SourceEntry, merge_parts, part_name,
                                        read_manifest, shard_name, write_manifest)
from lmdistill.teacher.packing import id_bits, pack_ids
from lmdistill.teacher.ranks import ONE_PROCESS, Processes, my_share

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CacheInputs:
    """What the cache is made from: encoded examples per cache key ('NAME' for training, 'eval:NAME' for eval)."""

    sources: dict[str, list[dict]]
    groups: dict[str, str]
    task_type: str
    max_length: int
    vocab_size: int
    pad_token_id: int
    teacher_name: str
    teacher_config_hash: str
    tokenizer_hash: str
    endpoint: str | None = None  # the server that answers for the teacher (endpoint.py), and the model it serves
    served_model: str | None = None
    student_tokenizer: str | None = None  # where tokenizer_hash's tokenizer was loaded from
    # A teacher with another tokenizer (every example then carries teacher_input_ids and pairs): its tokenizer's
    # hash and pad id, and the alignment rule (lmdistill.data.align.ALIGNMENT).
    teacher_tokenizer_hash: str | None = None
    teacher_pad_token_id: int | None = None
    alignment: str | None = None
    teachers: list[CachedTeacher] = field(default_factory=list)  # several teachers: the model is their ensemble


def payload_bytes_per_token(k: int, vocab_size: int, dtype: str) -> float:
    """Bytes a shard spends per counted token: packed ids, log-probs and the float32 tail (headers and per-example
    offsets, a few bytes per example, come on top)."""
    return k * id_bits(vocab_size) / 8 + k * DTYPES[dtype].itemsize + 4


def eval_key(name: str) -> str:
    return f"eval:{name}"


def source_name(key: str) -> str:
    """The source a cache key stands for: an eval set is routed like the training source of its name."""
    return key.removeprefix("eval:")


def counted_tokens(example: dict, task_type: str) -> int:
    """The rows the cache holds for an example: its aligned pairs across tokenizers, else its counted tokens."""
    if "pairs" in example:
        return len(example["pairs"])
    labels = example["labels"][1:] if task_type == "causal" else example["labels"]
    return sum(1 for x in labels if x != -100)


def plan_manifest(inputs: CacheInputs, settings: TeacherCacheSettings) -> Manifest:
    if settings.k > inputs.vocab_size:
        raise CacheError(f"teacher_cache.k = {settings.k} is larger than the vocabulary ({inputs.vocab_size} ids); "
                         f"use --k {min(64, inputs.vocab_size)} or any value up to {inputs.vocab_size}")
    sources = {}
    for key, examples in inputs.sources.items():
        sources[key] = SourceEntry(group=inputs.groups[key], fingerprint=examples_fingerprint(examples),
                                   examples=len(examples),
                                   tokens=sum(counted_tokens(ex, inputs.task_type) for ex in examples),
                                   num_shards=-(-len(examples) // settings.shard_examples))
    return Manifest(teacher=inputs.teacher_name, teacher_config_hash=inputs.teacher_config_hash,
                    tokenizer_hash=inputs.tokenizer_hash, task_type=inputs.task_type, max_length=inputs.max_length,
                    k=settings.k, temperature=settings.temperature, dtype=settings.dtype,
                    vocab_size=inputs.vocab_size, id_bits=id_bits(inputs.vocab_size),
                    shard_examples=settings.shard_examples, sources=sources, endpoint=inputs.endpoint,
                    served_model=inputs.served_model, student_tokenizer=inputs.student_tokenizer,
                    teacher_tokenizer_hash=inputs.teacher_tokenizer_hash, alignment=inputs.alignment,
                    teachers=inputs.teachers)


def _resume_point(out: Path, planned: Manifest) -> Manifest:
    """The manifest to continue from: the existing one when it describes the same cache, else a fresh plan."""
    existing = read_manifest(out)
    if existing is None:
        return planned
    old, new = existing.identity(), planned.identity()
    changed = [key for key in new if old.get(key) != new[key]]
    if changed:
        key = changed[0]
        detail = (f"source(s) {sorted(k for k in new['sources'] if old['sources'].get(k) != new['sources'][k])}"
                  if key == "sources" else f"{key}: cached {old.get(key)!r}, now {new[key]!r}")
        raise CacheError(f"{out} holds a teacher cache made with other settings ({detail}); "
                         "choose another --out, or delete that folder to rebuild it")
    # Who answers for the teacher does not change the content: the same weights in-process or served.
    return existing.model_copy(update={"endpoint": planned.endpoint, "served_model": planned.served_model,
                                       "student_tokenizer": planned.student_tokenizer})


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    """Write to a temp name, fsync, checksum, rename. Returns (bytes, sha256)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        size, digest = tmp.stat().st_size, sha256_file(tmp)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"writing teacher-cache shard {path} failed ({err.strerror or err}); nothing of it was "
                         "kept: free disk space and run the same command again to resume from the last complete "
                         "shard") from None
    return size, digest


def _capture_batches(model, examples: list[dict], manifest: Manifest, batch_size: int,
                     collator: DistillCollator) -> dict[int, tuple]:
    """A loaded teacher over the examples, batched by length to save padding: index -> (ids, logprobs, tail)."""
    length = "teacher_input_ids" if manifest.alignment else "input_ids"
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][length]))
    parts: dict[int, tuple] = {}
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        batch = collator([examples[i] for i in chosen])
        got = capture_paired_topk(model, batch, manifest.k, manifest.temperature, manifest.vocab_size) \
            if manifest.alignment else capture_topk(model, batch, manifest.task_type, manifest.k,
                                                     manifest.temperature, manifest.vocab_size)
        bounds = [0] + got.counts.cumsum(0).tolist()
        for j, i in enumerate(chosen):
            a, b = bounds[j], bounds[j + 1]
            parts[i] = (got.ids[a:b], got.logprobs[a:b], got.tail[a:b])
    return parts


def _shard_tensors(model, key: str, examples: list[dict], manifest: Manifest, batch_size: int,
                   collator: DistillCollator) -> dict[str, torch.Tensor]:
    """Capture one shard's examples of cache key `key` and lay them out in example order."""
    if isinstance(model, TeacherEnsemble):
        # Several teachers: their mixture, or the routed teacher alone, as a stage trains on it. Formed at the
        # capture temperature, so the kept log-probs are the target's own.
        model = model.for_source(source_name(key))
    if isinstance(model, EndpointTeacher):  # a served teacher: per example, concurrent requests
        parts = dict(enumerate(model.capture(examples, manifest.k)))
    else:
        parts = _capture_batches(model, examples, manifest, batch_size, collator)
    counts = torch.tensor([len(parts[i][0]) for i in range(len(examples))], dtype=torch.int64)
    ids = torch.cat([parts[i][0] for i in range(len(examples))])  # [n, k]
    tensors = {
        "row_ids": torch.tensor([ex["row_id"] for ex in examples], dtype=torch.int64),
        "offsets": torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
        "ids": pack_ids(ids, manifest.id_bits),
        "logprobs": torch.cat([parts[i][1] for i in range(len(examples))]).to(DTYPES[manifest.dtype]).contiguous(),
        "tail": torch.cat([parts[i][2] for i in range(len(examples))]).float(),
    }
    if manifest.alignment:
        tensors["pairs"] = torch.tensor([p for ex in examples for p in ex["pairs"]], dtype=torch.int32).reshape(-1, 2)
    return tensors


def _start(out: Path, planned: Manifest, processes: Processes) -> Manifest:
    """Every process checks the folder against the plan (so a mismatch fails on all of them alike); the main process
    clears what a dead run left (temp shards, unmerged parts) and writes the manifest; then all read it back."""
    manifest = _resume_point(out, planned)
    if processes.is_main_process:
        for stale in out.glob(".shard-*.tmp"):
            stale.unlink()  # a shard that was being written when a previous run died
        merge_parts(out, manifest)
    processes.wait_for_everyone()
    return read_manifest(out)


def build_cache(model, inputs: CacheInputs, settings: TeacherCacheSettings, out: str | Path,
                processes: Processes = ONE_PROCESS) -> Manifest:
    """Capture every shard not yet in `out`'s manifest; returns the final manifest. Safe to rerun after a crash.

    Under several processes each captures its share of the missing shards (shard i of the to-do list goes to process
    i mod W) into the same folder, listing them in its own manifest part; the main process merges the parts after a
    barrier. The shard files are the ones a single process writes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _start(out, plan_manifest(inputs, settings), processes)
    collator = DistillCollator(inputs.pad_token_id, task_type=inputs.task_type) if inputs.alignment is None \
        else CrossTokenizerCollator(inputs.pad_token_id, inputs.teacher_pad_token_id)
    keys = list(inputs.sources)
    todo = [(key, i) for key in keys for i in range(manifest.sources[key].num_shards) if manifest.shard(key, i) is None]
    if not todo:
        log.info("teacher cache %s is complete (%d shards)", out, manifest.total_shards)
        return manifest
    mine = my_share(todo, processes)
    listed = manifest if processes.is_main_process else manifest.model_copy(update={"shards": []})
    remaining = sum(counted_tokens(ex, inputs.task_type) for key, i in mine
                    for ex in inputs.sources[key][i * settings.shard_examples:(i + 1) * settings.shard_examples])
    log.info("teacher cache %s: %d of %d shards to capture, %d by process %d of %d (%d tokens, k=%d, T=%s)", out,
             len(todo), manifest.total_shards, len(mine), processes.process_index, processes.num_processes, remaining,
             manifest.k, manifest.temperature)
    columns = (TextColumn("caching teacher"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn())
    started, done = time.perf_counter(), 0
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("cache", total=remaining, rate="")
        for key, index in mine:
            lo = index * settings.shard_examples
            examples = inputs.sources[key][lo:lo + settings.shard_examples]
            tensors = _shard_tensors(model, key, examples, manifest, settings.batch_size, collator)
            path = out / shard_name(keys.index(key), index)
            size, digest = _write_shard(path, tensors, {"source": key, "index": str(index)})
            tokens = int(tensors["offsets"][-1])
            listed.shards.append(ShardEntry(file=path.name, source=key, index=index, start=lo,
                                            end=lo + len(examples), first_row=examples[0]["row_id"],
                                            last_row=examples[-1]["row_id"], tokens=tokens, bytes=size, sha256=digest))
            write_manifest(out, listed, part_name(processes.process_index))
            done += tokens
            rate = done / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=tokens, rate=f"{rate:,.0f} tok/s")
    log.info("teacher cache %s: %d tokens in %.1f s (%.0f tokens/s)", out, done, time.perf_counter() - started,
             done / max(time.perf_counter() - started, 1e-9))
    processes.wait_for_everyone()
    if processes.is_main_process:
        merge_parts(out, manifest)
        log.info("teacher cache %s: %.1f bytes per token", out, manifest.bytes_per_token())
    processes.wait_for_everyone()
    return read_manifest(out)
