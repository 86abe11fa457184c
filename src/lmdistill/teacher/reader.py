"""Reading a teacher cache for training: run checks against the manifest, checksums on first read, lookup by id.

Lookup is by example id (source index * 2**40 + row id, see data.mixture), never by step, so shuffling, several
epochs, gradient accumulation and a resumed run all read the right rows. Each lookup also checks that the batch has
exactly as many counted tokens per example as were cached (across tokenizers: that every cached pair's student
position is followed by a counted token): rows can never be silently misaligned with teacher outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lmdistill.data.mixture import split_example_id
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.errors import CacheError
from lmdistill.teacher.fingerprint import examples_fingerprint, sha256_file
from lmdistill.teacher.manifest import CachedTeacher, Manifest, ShardEntry, read_manifest
from lmdistill.teacher.packing import unpack_ids

REBUILD = "rebuild it with `lmdistill cache-teacher CONFIG`"


class TeacherCache:
    """A cache folder opened for reading. `example(key, position)` -> (ids [n, k] int64, logprobs [n, k], tail [n])."""

    def __init__(self, path: str | Path, max_open_shards: int = 8) -> None:
        self.path = Path(path)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise CacheError(f"no teacher cache at {self.path} (manifest.json missing); create it with "
                             "`lmdistill cache-teacher CONFIG` or fix teacher_cache.path")
        self.manifest: Manifest = manifest
        self._open: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._verified: set[str] = set()
        self._max_open = max_open_shards

    def check_run(self, tokenizer_hash: str, max_length: int, task_type: str, examples: dict[str, list[dict]],
                  tokenizer_name: str | None = None) -> None:
        """Refuse a run whose tokenizer, max_length, task or data differ from those the cache was made from."""
        m, where = self.manifest, f"teacher cache {self.path}"
        if m.tokenizer_hash != tokenizer_hash:
            names = f" (made for the student tokenizer of {m.student_tokenizer}, this run's is {tokenizer_name})" \
                if m.student_tokenizer and tokenizer_name else ""
            raise CacheError(f"{where} was made with a different tokenizer than this run's{names}; its token ids "
                             f"would not match: {REBUILD}")
        if m.max_length != max_length:
            raise CacheError(f"{where} was captured with data.max_length={m.max_length}, this run uses {max_length}; "
                             f"set data.max_length back to {m.max_length} or {REBUILD}")
        if m.task_type != task_type:
            raise CacheError(f"{where} holds a {m.task_type} teacher, this run is {task_type}: {REBUILD}")
        for key, rows in examples.items():
            entry = m.sources.get(key)
            if entry is None:
                raise CacheError(f"{where} has no entry for {key!r} (it has {sorted(m.sources)}): {REBUILD}")
            if entry.fingerprint != examples_fingerprint(rows):
                raise CacheError(f"{where}: the data of {key!r} changed since capture ({entry.examples} examples "
                                 f"cached, {len(rows)} now, or their tokens differ): {REBUILD}")
        missing = [key for key in examples if sum(s.source == key for s in m.shards) < m.sources[key].num_shards]
        if missing:
            raise CacheError(f"{where} is incomplete ({len(m.shards)} of {m.total_shards} shards; {missing} not "
                             "finished): run `lmdistill cache-teacher CONFIG` again to finish it")
        for shard in m.shards:
            if shard.source in examples:
                self._check_file(shard)

    def check_teachers(self, declared: list[CachedTeacher], temperature: float) -> None:
        """Refuse a run whose teachers differ from the mixture the cache holds (names, dtypes, weights, routing),
        or that mixes them at another temperature. `declared` is empty for a run of one teacher."""
        cached, where = self.manifest.teachers, f"teacher cache {self.path}"
        again = "capture it again with `lmdistill cache-teacher CONFIG --out NEW_FOLDER` and set teacher_cache.path"

        def names(teachers: list[CachedTeacher]) -> str:
            return ", ".join(t.name for t in teachers)

        if not cached and declared:
            raise CacheError(f"{where} holds one teacher's top-k ({self.manifest.teacher}), but this run mixes "
                             f"{len(declared)} teachers ({names(declared)}): {again}")
        if cached and not declared:
            raise CacheError(f"{where} holds the mixture of {len(cached)} teachers ({names(cached)}), but this run "
                             f"has one teacher: {again}")
        if len(cached) != len(declared):
            raise CacheError(f"{where} holds the mixture of {len(cached)} teachers ({names(cached)}), this run "
                             f"mixes {len(declared)} ({names(declared)}): {again}")
        for i, (old, new) in enumerate(zip(cached, declared), start=1):
            before, now = old.declared(), new.declared()
            for key in before:
                if before[key] != now[key]:
                    what = "weight (share of the mixture)" if key == "weight" else "routed sources" \
                        if key == "sources" else key
                    raise CacheError(f"{where}: teacher {i} ({new.name}) has {what} {before[key]!r} in the cache "
                                     f"but {now[key]!r} in this run: {again}")
        if cached and temperature != self.manifest.temperature:
            raise CacheError(f"{where} holds the teachers' mixture formed at temperature {self.manifest.temperature}, "
                             f"and a mixture cannot be re-tempered; this stage trains at {temperature}: set the "
                             f"stage's temperature to {self.manifest.temperature}, or {again}")

    def _check_file(self, shard: ShardEntry) -> Path:
        file = self.path / shard.file
        if not file.exists():
            raise CacheError(f"teacher-cache shard {file} is missing: {REBUILD} (it resumes and rewrites only "
                             "shards that are missing, after you delete their entries, or all of it in a new folder)")
        if file.stat().st_size != shard.bytes:
            raise CacheError(f"teacher-cache shard {file} is truncated or changed ({file.stat().st_size} bytes, "
                             f"manifest says {shard.bytes}): delete the cache folder and {REBUILD}")
        return file

    def _load(self, shard: ShardEntry) -> dict[str, Tensor]:
        if shard.file in self._open:
            self._open.move_to_end(shard.file)
            return self._open[shard.file]
        file = self._check_file(shard)
        if shard.file not in self._verified:
            if sha256_file(file) != shard.sha256:
                raise CacheError(f"teacher-cache shard {file} is corrupted (sha256 does not match the manifest): "
                                 f"delete the cache folder and {REBUILD}")
            self._verified.add(shard.file)
        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise CacheError(f"teacher-cache shard {file} cannot be read ({err}): {REBUILD}") from None
        n = int(tensors["offsets"][-1])
        tensors["ids"] = unpack_ids(tensors["ids"], self.manifest.id_bits, n * self.manifest.k).reshape(
            n, self.manifest.k)
        self._open[shard.file] = tensors
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return tensors

    def _rows(self, key: str, position: int) -> tuple[dict[str, Tensor], slice]:
        index = position // self.manifest.shard_examples
        shard = self.manifest.shard(key, index)
        if shard is None:
            raise CacheError(f"teacher cache {self.path} has no shard {index} of {key!r}: run `lmdistill "
                             "cache-teacher CONFIG` again to finish it")
        tensors = self._load(shard)
        j = position - shard.start
        return tensors, slice(int(tensors["offsets"][j]), int(tensors["offsets"][j + 1]))

    def example(self, key: str, position: int) -> tuple[Tensor, Tensor, Tensor]:
        """Cached rows of example `position` (index into the source's encoded examples) of source `key`."""
        tensors, rows = self._rows(key, position)
        return tensors["ids"][rows], tensors["logprobs"][rows], tensors["tail"][rows]

    def example_pairs(self, key: str, position: int) -> Tensor:
        """A cache across tokenizers: the (student position, teacher position) of each of the example's rows."""
        tensors, rows = self._rows(key, position)
        return tensors["pairs"][rows].long()


class CacheLookup:
    """The trainer's offline teacher (train.trainer.TeacherCacheLookup): example ids -> top-k teacher rows.

    keys[i] is the cache key of source index i in the example ids; positions[key] maps row id -> position.
    """

    def __init__(self, cache: TeacherCache, keys: list[str], positions: dict[str, dict[int, int]], tail: str) -> None:
        self.cache = cache
        self.keys = keys
        self.positions = positions
        self.tail = tail
        self.cache_temperature = cache.manifest.temperature

    scores_any_tokens = False  # only the examples it was captured from, by their ids

    def lookup(self, batch: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """batch: a collated batch, its example_id [B] read; labels [B, T'] aligned with the student logits (after
        the causal shift). Returns ids [B, T', k] int64, logprobs [B, T', k] float32 and the stored tail mass
        [B, T'] float32 (zeros where labels are -100)."""
        example_ids = batch.get("example_id")
        if example_ids is None:
            raise CacheError("a cached-teacher stage got a batch without example ids; build its data with "
                             "MixtureDataset (or add 'example_id' to each example)")
        k = self.cache.manifest.k
        ids = torch.zeros(*labels.shape, k, dtype=torch.int64)
        logprobs = torch.zeros(*labels.shape, k, dtype=torch.float32)
        tail = torch.zeros(*labels.shape, dtype=torch.float32)
        counted = (labels != IGNORE_INDEX).cpu()
        for b, example_id in enumerate(example_ids.tolist()):
            source, row = split_example_id(example_id)
            key = self.keys[source]
            where = counted[b].nonzero().squeeze(1)
            if not len(where):  # a row that trains nothing (a filler completing the processes' last round)
                continue
            row_ids, lps, row_tail = self.cache.example(key, self.positions[key][row])
            if len(where) != len(row_ids):
                raise CacheError(f"teacher cache {self.cache.path}: row {row} of {key!r} has {len(row_ids)} cached "
                                 f"tokens but the batch counts {len(where)}; the data no longer matches: {REBUILD}")
            ids[b, where] = row_ids
            logprobs[b, where] = lps.float()
            tail[b, where] = row_tail.float()
        return ids.to(labels.device), logprobs.to(labels.device), tail.to(labels.device)


class PairedCacheLookup:
    """The offline teacher of uld / cross_vocab_kl (a cache captured across tokenizers): example ids -> the cached
    pairs and the teacher's top-k rows at them. keys and positions as for CacheLookup."""

    def __init__(self, cache: TeacherCache, keys: list[str], positions: dict[str, dict[int, int]]) -> None:
        self.cache = cache
        self.keys = keys
        self.positions = positions

    def lookup(self, example_ids: Tensor | None,
               labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """example_ids [B]; labels [B, T] as the batch holds them (not shifted). Returns, over the batch's pairs in
        example order: batch row [n] and student position [n] (int64), the teacher's ids [n, k] int64, log-probs
        [n, k] float32 and tail [n] float32, on labels' device."""
        if example_ids is None:
            raise CacheError("a cached-teacher stage got a batch without example ids; build its data with "
                             "MixtureDataset (or add 'example_id' to each example)")
        found = []
        for b, example_id in enumerate(example_ids.tolist()):
            source, row = split_example_id(example_id)
            key = self.keys[source]
            position = self.positions[key][row]
            pairs, (ids, lps, tail) = self.cache.example_pairs(key, position), self.cache.example(key, position)
            if not bool((labels[b] != IGNORE_INDEX).any()):  # a row that trains nothing (a filler): no pairs
                pairs, ids, lps, tail = pairs[:0], ids[:0], lps[:0], tail[:0]
            after = pairs[:, 0] + 1
            if len(pairs) and (int(after.max()) >= labels.shape[1]
                               or bool((labels[b, after.to(labels.device)] == IGNORE_INDEX).any())):
                raise CacheError(f"teacher cache {self.cache.path}: row {row} of {key!r} has cached pairs at tokens "
                                 f"the batch does not train on; the data no longer matches: {REBUILD}")
            found.append((torch.full((len(pairs),), b, dtype=torch.long), pairs[:, 0], ids, lps.float(), tail.float()))
        return tuple(torch.cat(parts).to(labels.device) for parts in zip(*found))
