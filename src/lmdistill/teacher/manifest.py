"""manifest.json of a teacher cache: what the cache was made from, and which shards are complete.

The manifest is rewritten atomically (temp file + rename) after every shard, so it only ever lists shards whose
file was fully written, checksummed and renamed into place: the resume point of `cache-teacher`.

Under several processes the main process keeps manifest.json and process r > 0 lists the shards it finished in
its own manifest.rank-R.json (same identity, its shards only). The main process merges those parts into
manifest.json once every process is done, or at the start of the next run when a run died before that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from lmdistill.errors import CacheError

MANIFEST = "manifest.json"
FORMAT = "lmdistill-teacher-cache/1"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceEntry(_Model):
    """One cached source: a training source or an eval set (group 'eval', key 'eval:NAME')."""

    group: Literal["train", "eval"]
    fingerprint: str
    examples: int
    tokens: int
    num_shards: int


class ShardEntry(_Model):
    """Examples [start, end) of a source (positions in its encoded example list), row ids first..last."""

    file: str
    source: str
    index: int
    start: int
    end: int
    first_row: int
    last_row: int
    tokens: int
    bytes: int
    sha256: str


class CachedTeacher(_Model):
    """One teacher of a cached mixture (`teachers:`): the cache holds their weighted mixture at the capture
    temperature, and for a routed source this teacher's distribution alone."""

    name: str
    dtype: str
    weight: float  # share of the mixture (the configured weights normalised to sum 1)
    sources: list[str] = []  # routed sources: their examples were scored by this teacher alone
    config_hash: str | None = None  # None in a run's description (the run loads no teacher to hash)

    def declared(self) -> dict:
        """What a config states about this teacher (a run compares it with the cache's without loading it)."""
        return self.model_dump(exclude={"config_hash"})


class Manifest(_Model):
    format: Literal["lmdistill-teacher-cache/1"] = FORMAT
    teacher: str
    teacher_config_hash: str
    tokenizer_hash: str
    task_type: str
    max_length: int
    k: int
    temperature: float
    dtype: str
    vocab_size: int
    id_bits: int
    shard_examples: int
    sources: dict[str, SourceEntry]
    shards: list[ShardEntry] = []
    endpoint: str | None = None  # the server that answered for the teacher (None: loaded in-process)
    served_model: str | None = None
    student_tokenizer: str | None = None  # where the student's tokenizer (tokenizer_hash) was loaded from
    # A teacher with another tokenizer: the hash of its tokenizer, and the rule that paired its positions with the
    # student's (lmdistill.data.align.ALIGNMENT). None: the teacher read the student's tokens.
    teacher_tokenizer_hash: str | None = None
    alignment: str | None = None
    teachers: list[CachedTeacher] = []  # several teachers: whose mixture (or routing) the cache holds

    def identity(self) -> dict:
        """Everything that decides the cache's content (not which shards are done yet, nor who computed them, nor
        where the models were loaded from)."""
        return self.model_dump(exclude={"shards", "teacher", "endpoint", "served_model", "student_tokenizer"})

    def shard(self, source: str, index: int) -> ShardEntry | None:
        return next((s for s in self.shards if s.source == source and s.index == index), None)

    @property
    def total_shards(self) -> int:
        return sum(s.num_shards for s in self.sources.values())

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.total_shards

    def bytes_per_token(self) -> float:
        tokens = sum(s.tokens for s in self.shards)
        return sum(s.bytes for s in self.shards) / max(tokens, 1)


def shard_name(source_position: int, index: int) -> str:
    return f"shard-{source_position:03d}-{index:05d}.safetensors"


def part_name(process_index: int) -> str:
    """The manifest a process lists its finished shards in (the main process, 0, keeps manifest.json itself)."""
    return MANIFEST if process_index == 0 else f"manifest.rank-{process_index}.json"


def read_manifest(folder: str | Path, name: str = MANIFEST) -> Manifest | None:
    """The manifest of `folder` (or one process's part of it), or None when the folder has none yet."""
    path = Path(folder) / name
    if not path.exists():
        return None
    try:
        return Manifest.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as err:
        raise CacheError(f"{path} is not a readable lmdistill teacher-cache manifest ({str(err).splitlines()[0]}); "
                         "delete the folder and run `lmdistill cache-teacher` again") from None


def write_manifest(folder: str | Path, manifest: Manifest, name: str = MANIFEST) -> None:
    path = Path(folder) / name
    tmp = path.with_name(f".{name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(manifest.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def merge_parts(folder: str | Path, manifest: Manifest) -> Manifest:
    """Fold the other processes' manifest parts into `manifest` (shards in source, then index order, as one process
    lists them), write it as manifest.json, then delete the parts. A part made with other settings (a run with
    another k or data in the same folder) lists no shard of this cache: it is only deleted."""
    folder = Path(folder)
    parts = sorted(folder.glob("manifest.rank-*.json"))
    for path in parts:
        part = read_manifest(folder, path.name)
        if part.identity() == manifest.identity():
            manifest.shards += [s for s in part.shards if manifest.shard(s.source, s.index) is None]
    order = list(manifest.sources)
    manifest.shards.sort(key=lambda s: (order.index(s.source), s.index))
    write_manifest(folder, manifest)  # before the parts go, so a crash in between loses nothing
    for path in parts:
        path.unlink()
    return manifest
