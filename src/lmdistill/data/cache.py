"""Tokenising a source through `datasets` (`map`, batched, `num_proc` workers), cached on disk.

The cache key is a hash of the normalised rows (the data fingerprint: content, column mapping and row ids
included), the tokenizer (vocabulary, normalisation, special tokens, chat template), the layout options
(max_length, task_type, train_on, text overlap, completion layout) and the source name, so a re-run, a resume
or a second command over the same data reads the tokenised examples back instead of tokenising again, and any
change to one of those tokenises afresh. Each entry is a `datasets.save_to_disk` folder `CACHE_DIR/<key>/`; the
log says whether a source was a cache hit or miss. Causal labels are stored as the spans of trained tokens (they
are the input ids there, -100 elsewhere), which halves what a cache hit turns back into Python lists.

CACHE_DIR: `data.cache_dir`, else $LMDISTILL_CACHE_DIR, else ~/.cache/lmdistill/tokenized.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmdistill.data.badrows import BadRows
from lmdistill.data.tokenize import (IGNORE_INDEX, EncodedSource, Layout, Outcome, collect, encode_batch,
                                     prepare_tokenizer)

logger = logging.getLogger(__name__)

CACHE_FORMAT = 4  # bump when what an entry holds changes
_BATCH = 1000  # rows per map batch
_CALL_STATE = re.compile(r'"(truncation|padding)":(null|\{(?:[^{}]|\{[^{}]*\})*\})')


def default_cache_dir() -> Path:
    env = os.environ.get("LMDISTILL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmdistill" / "tokenized"


def tokenizer_hash(tokenizer: Any) -> str:
    """The token <-> id mapping, normalisation, special tokens and chat template; the backend's padding and
    truncation state (set per call) is left out. Hashes the backend's own serialisation as it stands, which
    keeps a 150k vocabulary well under a second."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(_CALL_STATE.sub("", backend.to_str(), count=2).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"chat_template": getattr(tokenizer, "chat_template", None),
                         "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()}},
                        sort_keys=True).encode())
    return h.hexdigest()


def cache_key(rows: list[dict], tokenizer: Any, layout: Layout, name: str) -> str:
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "layout": asdict(layout), "name": name,
                                   "tokenizer": tokenizer_hash(tokenizer)}).encode())
    h.update(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def _trained_spans(ids: list[int], labels: list[int]) -> list[int] | None:
    """[start0, end0, start1, end1, ...] of the runs where labels equal ids (-100 elsewhere), or None when the
    labels are something else (seq2seq targets)."""
    if len(ids) != len(labels):
        return None
    spans: list[int] = []
    for i, (token, label) in enumerate(zip(ids, labels)):
        trained = label == token
        if not trained and label != IGNORE_INDEX:
            return None
        if trained != (len(spans) % 2 == 1):  # a run starts or ends here
            spans.append(i)
    return spans + [len(ids)] if len(spans) % 2 else spans


def _labels(ids: list[int], spans: list[int]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in zip(spans[::2], spans[1::2]):
        labels[start:end] = ids[start:end]
    return labels


def _map_batch(batch: dict, indices: list[int], tokenizer: Any, layout: Layout, name: str) -> dict:
    """One map batch: every example becomes an entry, a bad row one entry with its reason and no tokens."""
    out: dict[str, list] = {k: [] for k in ("index", "input_ids", "labels", "spans", "prompt_length", "row_id",
                                            "part", "text_tokens", "bad_reason", "bad_detail")}
    rows = [json.loads(s) for s in batch["row"]]
    for index, outcome in zip(indices, encode_batch(rows, tokenizer, layout, name)):
        entries = [{"bad_reason": outcome[0], "bad_detail": outcome[1]}] if isinstance(outcome, tuple) else outcome
        for entry in entries:
            out["index"].append(index)
            ids, labels = entry.get("input_ids", []), entry.get("labels", [])
            spans = _trained_spans(ids, labels)
            out["input_ids"].append(ids)
            out["labels"].append([] if spans is not None else labels)
            out["spans"].append(spans or [])
            for key, empty in (("prompt_length", -1), ("row_id", -1), ("part", 0), ("text_tokens", -1),
                               ("bad_reason", ""), ("bad_detail", "")):
                out[key].append(entry.get(key, empty))
    return out


def _tokenise(rows: list[dict], tokenizer: Any, layout: Layout, name: str, num_proc: int):
    import datasets

    table = datasets.Dataset.from_dict({"row": [json.dumps(r, ensure_ascii=False) for r in rows]})
    return table.map(_map_batch, batched=True, batch_size=_BATCH, with_indices=True, remove_columns=["row"],
                     num_proc=num_proc if num_proc > 1 and len(rows) > _BATCH else None,
                     fn_kwargs={"tokenizer": tokenizer, "layout": layout, "name": name},
                     desc=f"tokenising {name}", new_fingerprint=f"lmdistill-{name}")


def _outcomes(table, num_rows: int, task_type: str) -> list[Outcome]:
    """Entries back into per-row outcomes, in row order."""
    columns = {k: table.data.column(k).to_pylist() for k in table.column_names}
    outcomes: list[Outcome] = [[] for _ in range(num_rows)]
    for i, index in enumerate(columns["index"]):
        if columns["bad_reason"][i]:
            outcomes[index] = (columns["bad_reason"][i], columns["bad_detail"][i])
            continue
        ids = columns["input_ids"][i]
        example = {"input_ids": ids, "labels": columns["labels"][i] or _labels(ids, columns["spans"][i]),
                   "row_id": columns["row_id"][i], "part": columns["part"][i]}
        if task_type == "causal":
            example["prompt_length"] = columns["prompt_length"][i]
        if columns["text_tokens"][i] >= 0:  # a plain-text example (see tokenize.py)
            example["text_tokens"] = columns["text_tokens"][i]
        outcomes[index].append(example)
    return outcomes


def encode_source(rows: list[dict], tokenizer: Any, layout: Layout, name: str, strict: bool = False,
                  cache_dir: str | Path | None = None, num_proc: int = 1, use_cache: bool = True) -> EncodedSource:
    """encode_rows through `datasets.map`, read from / written to the cache unless `use_cache` is False (see the
    module docstring)."""
    import datasets

    layout.check()
    prepare_tokenizer(tokenizer)
    started = time.perf_counter()
    key = cache_key(rows, tokenizer, layout, name)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    entry = folder / key
    if use_cache and (entry / "dataset_info.json").is_file():
        table = datasets.load_from_disk(str(entry))
        hit = "hit"
    elif not use_cache:
        table, hit = _tokenise(rows, tokenizer, layout, name, num_proc), "off"
    else:
        table = _tokenise(rows, tokenizer, layout, name, num_proc)
        partial = folder / f".{key}.{os.getpid()}.partial"
        table.save_to_disk(str(partial))
        shutil.rmtree(entry, ignore_errors=True)  # another process may have written it meanwhile
        os.replace(partial, entry)
        hit = "miss"
    encoded = collect(rows, _outcomes(table, len(rows), layout.task_type), BadRows(f"source '{name}'", strict), name)
    logger.info("source %s: tokenisation cache %s (%s, %d examples, %.1f s)", name, hit, entry, len(encoded.examples),
                time.perf_counter() - started)
    return encoded
