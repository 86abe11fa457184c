"""Stable hashes that tie a teacher cache to what it was made from: tokenizer, teacher config, encoded data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                         "_attn_implementation_autoset", "architectures", "use_cache"}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def model_config_hash(config: Any) -> str:
    """A model's architecture config (a transformers PretrainedConfig), without paths and version stamps."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return _digest(data)


def examples_fingerprint(examples: list[dict]) -> str:
    """The encoded examples exactly as training sees them: row ids, token ids and label masks, in order."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.get("row_id"), ex["input_ids"], ex["labels"]], separators=(",", ":")).encode())
    return h.hexdigest()
