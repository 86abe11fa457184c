"""Data layer throughput: detection + normalisation + tokenisation of an alpaca-style source, first and cached run.

Builds (once, in --workdir) a byte-level BPE tokenizer with a ~150k vocabulary made locally from merges over
synthetic words (no hub; training one that large takes minutes), and a JSON file of --rows alpaca-style rows (instruction, half with an input, output). Then runs
each case in a fresh process, so times include imports and peak memory is that process's own:

  first      load_source + encode_source with an empty tokenisation cache (datasets.map, then saved)
  cached     the same again: the cache is read back instead of tokenising
  in-memory  load_source + encode_rows (no datasets, no cache), for comparison

Columns: rows/s over the data step (load + tokenise), wall and CPU seconds of that step (CPU time is the fairer
figure on a shared machine), seconds spent on imports and loading the tokenizer, seconds from process start to the
first collated training batch (all of it, plus mixture and collate) in wall and in this process's CPU time, and
peak resident memory.
Target (issue 14): the cached run reaches its first batch in under 10 s for 50k rows.

    .venv/bin/python bench/data_throughput.py [--rows 50000] [--vocab 150000] [--num-proc 1] [--workdir DIR]
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

SYLLABLES = [a + b for a in "bcdfghjklmnprstvwz" for b in ("a", "e", "i", "o", "u", "ai", "ou", "ea")]
WORDS = ["the", "bank", "reports", "market", "yield", "growth", "risk", "fund", "bond", "rate", "quarter", "loss",
         "profit", "cash", "flow", "investor", "price", "share", "revenue", "cost", "margin", "debt", "equity"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) if rng.random() < 0.6 else _word(rng) for _ in range(n)).capitalize() + "."


def build_merges(vocab: int) -> list[tuple[str, str]]:
    """BPE merges over the synthetic words: their syllables and words built left to right (plain and after a
    space, which byte-level BPE writes as "Ġ"), then random 2-4 syllable words until the vocabulary is full."""
    from tokenizers import pre_tokenizers

    rng = random.Random(1)
    merges: list[tuple[str, str]] = []
    have = set(pre_tokenizers.ByteLevel.alphabet())

    def token(parts: list[str]) -> str:
        current = parts[0]
        for part in parts[1:]:
            if current + part not in have:
                merges.append((current, part))
                have.add(current + part)
            current += part
        return current

    for piece in SYLLABLES + WORDS:
        token(list(piece))
        token(["Ġ", *piece])
    while len(have) < vocab:
        syllables = [rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))]
        first = token(["Ġ", *syllables[0]]) if rng.random() < 0.7 else syllables[0]
        token([first, *syllables[1:]])
    return merges


def build_inputs(workdir: Path, rows: int, vocab: int) -> tuple[Path, Path]:
    """The tokenizer folder and the data file, built once per workdir."""
    tok_dir, data = workdir / f"tokenizer-{vocab}", workdir / f"alpaca-{rows}.json"
    rng = random.Random(0)
    if not tok_dir.exists():
        from lmdistill.models.tiny import tokenizer_from_merges

        tokenizer_from_merges(build_merges(vocab)).save_pretrained(tok_dir)
    if not data.exists():
        records = []
        for i in range(rows):
            record = {"instruction": _sentence(rng, rng.randint(8, 30)),
                      "output": " ".join(_sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(1, 6)))}
            if i % 2:
                record["input"] = " ".join(_sentence(rng, 15) for _ in range(rng.randint(1, 4)))
            records.append(record)
        data.write_text(json.dumps(records))
    return tok_dir, data


def peak_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(case: str, tok_dir: Path, data: Path, cache: Path, num_proc: int) -> dict:
    """One case in this process; returns its measurements."""
    import datasets  # noqa: F401  (imported before the clock starts: the data step times data work only)
    from transformers import AutoTokenizer

    from lmdistill.data.cache import encode_source
    from lmdistill.data.collate import DistillCollator
    from lmdistill.data.formats import load_source
    from lmdistill.data.mixture import MixtureDataset
    from lmdistill.data.tokenize import Layout, encode_rows

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    ready = time.perf_counter() - START
    started, cpu = time.perf_counter(), time.process_time()
    loaded = load_source(data)
    if case == "in-memory":
        encoded = encode_rows(loaded.rows, tokenizer, max_length=512, source_name="alpaca")
    else:
        encoded = encode_source(loaded.rows, tokenizer, Layout(max_length=512), "alpaca", cache_dir=cache,
                                num_proc=num_proc)
    step, cpu = time.perf_counter() - started, time.process_time() - cpu
    mixture = MixtureDataset({"alpaca": encoded.examples}, {"alpaca": 1.0}, num_draws=1000)
    DistillCollator(tokenizer.pad_token_id)([mixture[i] for i in range(8)])
    return {"case": case, "rows": loaded.num_read, "examples": len(encoded.examples), "vocab": len(tokenizer),
            "rows_per_s": loaded.num_read / step, "step_s": step, "cpu_s": cpu, "ready_s": ready,
            "first_batch_s": time.perf_counter() - START, "first_batch_cpu_s": time.process_time(),
            "peak_mib": peak_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--num-proc", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lmdistill-bench-data"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tok_dir, data = build_inputs(args.workdir, args.rows, args.vocab)
    cache = args.workdir / "cache"
    if args.child:
        print(json.dumps(child(args.child, tok_dir, data, cache, args.num_proc)))
        return
    shutil.rmtree(cache, ignore_errors=True)
    results = []
    for case in ("first", "cached", "in-memory"):
        out = subprocess.run([sys.executable, __file__, "--child", case, "--rows", str(args.rows), "--vocab",
                              str(args.vocab), "--num-proc", str(args.num_proc), "--workdir", str(args.workdir)],
                             check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    first = results[0]
    print(f"{first['rows']} alpaca-style rows -> {first['examples']} examples, vocabulary {first['vocab']}, "
          f"max_length 512, num_proc {args.num_proc}")
    print("| run | rows/s | data step (s) | data step CPU (s) | imports + tokenizer (s) | start to first batch (s) "
          "| CPU to first batch (s) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['case']} | {r['rows_per_s']:,.0f} | {r['step_s']:.1f} | {r['cpu_s']:.1f} | {r['ready_s']:.1f} | "
              f"{r['first_batch_s']:.1f} | {r['first_batch_cpu_s']:.1f} | {r['peak_mib']:,.0f} |")


if __name__ == "__main__":
    main()
