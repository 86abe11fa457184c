"""Teacher on a vLLM server vs in-process: tokens/s of `cache-teacher` and `generate` for a tiny teacher.

    .ci/engine_venv.sh && .venv/bin/python bench/teacher_server.py [--rows 200] [--max-new-tokens 32]

Builds a tokenizer, a teacher (4x256, head_dim 64: vLLM's CPU attention rejects tiny heads) and a student (2x64)
from configs (no hub), writes `--rows` text rows, starts vLLM on the teacher from the engine venv, then times each
command in-process and through the server (`teacher.endpoint`). On CPU the numbers are indicative only; the point
is the path, measured. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from lmdistill.config import config_from_dict
from lmdistill.models.tiny import tiny_causal_lm, train_tokenizer
from lmdistill.teacher.local_server import start_vllm, stop
from lmdistill.train.teacher_commands import cache_teacher, generate

WORDS = ("bank market fund company analyst trader reports expects buys sells explains measures predicts reviews higher "
         "yields quarterly results small loss strong growth new bonds interest rate cash flow annual report risk "
         "dividends today this year March after the meeting for investors again slowly with care").split()


def _setup(folder: Path, rows: int) -> dict:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 40))) + "." for _ in range(rows)]
    tok = train_tokenizer(texts, vocab_size=1024)
    for name, layers, width, heads, seed in (("teacher", 4, 256, 4, 1), ("student", 2, 64, 4, 2)):
        tiny_causal_lm(len(tok), num_layers=layers, hidden_size=width, num_heads=heads,
                       seed=seed).save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {"teacher": {"name": str(folder / "teacher")}, "student": {"name": str(folder / "student")},
            "data": {"max_length": 64, "sources": {"text": {"path": str(folder / "data.jsonl")}}},
            "training": {"report_to": []}, "evaluation": {"enabled": False, "num_samples": 0},
            "teacher_cache": {"batch_size": 32, "k": 32}, "stages": [{"name": "s", "teacher_source": "cache"}]}


def _timed(label: str, fn) -> tuple[str, float]:
    start = time.perf_counter()
    tokens = fn()
    return label, tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = _setup(folder, args.rows)
        proc, url = start_vllm(folder / "teacher", folder / "vllm.log")
        try:
            results = []
            for where, endpoint in (("in-process", None), ("vLLM server", url)):
                data = json.loads(json.dumps(base))
                data["output_dir"] = str(folder / where.replace(" ", "_"))
                data["teacher"]["endpoint"] = endpoint
                # Every text row is continued from its first half (generation.text_prompt_fraction).
                data["generation"] = {"max_new_tokens": args.max_new_tokens, "do_sample": False, "batch_size": 16}
                config = config_from_dict(data)
                results.append(_timed(f"cache-teacher, {where}",
                                      lambda: sum(s.tokens for s in cache_teacher(config)[1].shards)))

                def generated() -> int:
                    path, _ = generate(config)
                    return sum(len(json.loads(line)["completion_ids"]) for line in path.read_text().splitlines())

                results.append(_timed(f"generate, {where}", generated))
        finally:
            stop(proc)
    print(f"| command ({args.rows} rows) | tokens/s |\n|---|---|")
    for label, rate in results:
        print(f"| {label} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
