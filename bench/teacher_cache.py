"""Teacher-cache benchmark: bytes per token, KL gap of top-k targets, and epoch time live vs cached.

    .venv/bin/python bench/teacher_cache.py [--rows 2000] [--max-length 64]

Builds a tokenizer, a teacher (8x256) and a student (2x64) from configs (no hub), writes `--rows` text rows, then:
  1. caches the teacher at k in {8, 32, 64} and reports measured bytes per token, the same payload formula at
     V = 151,936 (Qwen2.5), and the ratio to full-vocabulary fp16 logits (2 V bytes per token);
  2. the KL gap: mean per token of |KL_full(p || q) - KL_topk(p || q)| between the teacher and the (untrained)
     student, full-vocabulary targets vs the cached top-k ones (bucket tail), at T = 1;
  3. wall time of one epoch of the same stage with the teacher live and with the k = 64 cache.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from lmdistill.config import config_from_dict
from lmdistill.losses import forward_kl, topk_kl
from lmdistill.models.tiny import tiny_causal_lm, train_tokenizer
from lmdistill.teacher.cache import payload_bytes_per_token
from lmdistill.train.teacher_commands import cache_teacher
from lmdistill.teacher.reader import TeacherCache
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.prepare import prepare

QWEN_VOCAB = 151_936
WORDS = ("bank market fund company analyst trader reports expects buys sells explains measures predicts reviews higher "
         "yields quarterly results small loss strong growth new bonds interest rate cash flow annual report risk "
         "dividends today this year March after the meeting for investors again slowly with care").split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) + "." for _ in range(n)]


def _setup(folder: Path, rows: int, max_length: int) -> dict:
    texts = _texts(rows)
    tok = train_tokenizer(texts, vocab_size=1024)
    vocab = len(tok)
    for name, layers, width, seed in (("teacher", 8, 256, 1), ("student", 2, 64, 2)):
        tiny_causal_lm(vocab, num_layers=layers, hidden_size=width, seed=seed).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    kd = [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]
    return {"teacher": {"name": str(folder / "teacher")}, "student": {"name": str(folder / "student")},
            "data": {"max_length": max_length, "sources": {"text": {"path": str(folder / "data.jsonl")}}},
            "training": {"batch_size": 16, "learning_rate": 1e-3, "report_to": [], "logging_steps": 50,
                         "save_total_limit": 1},
            "evaluation": {"enabled": False, "num_samples": 0},
            "teacher_cache": {"batch_size": 32},
            "stages": [{"name": "epoch", "epochs": 1, "losses": kd, "save_steps": 10_000}]}


def _params(path: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


def _kl_gap(config, cache_dir: Path, max_examples: int = 256) -> tuple[float, float]:
    """(mean |full KL - top-k KL| per token, mean full KL per token) over the first examples."""
    from transformers import AutoModelForCausalLM

    prep = prepare(config, load_teacher=False)
    teacher = AutoModelForCausalLM.from_pretrained(config.teacher.name).eval()
    student = AutoModelForCausalLM.from_pretrained(config.student.name).eval()
    cache = TeacherCache(cache_dir)
    vocab = cache.manifest.vocab_size
    gaps, fulls = [], []
    with torch.no_grad():
        for position, ex in enumerate(prep.sources["text"][:max_examples]):
            ids = torch.tensor([ex["input_ids"]])
            counted = torch.tensor(ex["labels"][1:]) != -100
            t = teacher(ids).logits[0, :-1][counted][:, :vocab]
            s = student(ids).logits[0, :-1][counted][:, :vocab]
            top_ids, top_lps, _ = cache.example("text", position)
            full = forward_kl(s, t, reduction="sum")
            cached = topk_kl(s, top_ids, top_lps.float(), reduction="sum")
            gaps.append(abs(float(full - cached)))
            fulls.append(float(full))
            gaps[-1] /= len(t)
            fulls[-1] /= len(t)
    return sum(gaps) / len(gaps), sum(fulls) / len(fulls)


def _epoch_seconds(config_dict: dict, folder: Path, name: str, cache_dir: Path | None) -> float:
    data = json.loads(json.dumps(config_dict))
    data["output_dir"] = str(folder / name)
    if cache_dir is not None:
        data["stages"][0]["teacher_source"] = "cache"
        data["teacher_cache"]["path"] = str(cache_dir)
    run_dir = run_pipeline(config_from_dict(data))
    history = json.loads((run_dir / "epoch" / "log_history.json").read_text())
    return next(h["train_runtime"] for h in history if "train_runtime" in h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = _setup(folder, args.rows, args.max_length)
        config = config_from_dict({**base, "output_dir": str(folder / "run")})
        ratio = _params(folder / "teacher") / _params(folder / "student")
        print(f"teacher:student parameters = {ratio:.1f}:1, rows = {args.rows}, max_length = {args.max_length}\n")
        print("| k | bytes/token (measured) | bytes/token at V=151,936 | vs fp16 full logits at V=151,936 "
              "| capture s | mean KL gap / token | mean full KL / token |")
        print("|---|---|---|---|---|---|---|")
        dirs = {}
        for k in (8, 32, 64):
            start = time.perf_counter()
            out, manifest = cache_teacher(config, out=folder / f"cache{k}", k=k)
            seconds = time.perf_counter() - start
            dirs[k] = out
            qwen = payload_bytes_per_token(k, QWEN_VOCAB, "float16")
            gap, full = _kl_gap(config, out)
            print(f"| {k} | {manifest.bytes_per_token():.1f} (V={manifest.vocab_size}) | {qwen:.0f} | "
                  f"{2 * QWEN_VOCAB / qwen:,.0f}x smaller | {seconds:.1f} | {gap:.4f} | {full:.4f} |")
        live = _epoch_seconds(base, folder, "live", None)
        cached = _epoch_seconds(base, folder, "cached", dirs[64])
        print(f"\n| one epoch | live teacher | cached (k=64) | speed-up |\n|---|---|---|---|\n"
              f"| {args.rows} rows | {live:.1f} s | {cached:.1f} s | {live / cached:.2f}x |")


if __name__ == "__main__":
    main()
