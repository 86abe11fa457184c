"""Cross-tokenizer distillation on the embedded demo task: which path teaches the student most?

The teacher speaks a SentencePiece-style tokenizer (metaspace, byte fallback, BOS, Zephyr-style template), the
student a byte-level BPE (no BOS, ChatML template), both trained here on the demo's texts. The teacher learns every
company's facts (CE on the demo's teacher mix); then four students of one size train the same number of steps:
  ce           CE on the labelled QA only (a fifth of the companies), no teacher;
  seq_kd       sequence-level KD: CE on the teacher's greedy answers to every company's training prompts;
  uld          the same teacher text, CE + uld against the live teacher at aligned positions;
  hybrid       the same teacher text, CE + cross_vocab_kl (shared-vocabulary KL + ULD on the rest);
  uld_cached_kK, hybrid_cached_kK   the same two from a teacher cache across tokenizers, one pair per --cache-k
               (teacher_cache.k; 64 by default): `cache-teacher` once per k (its time counts in uld_cached_kK's
               seconds), then no teacher in memory. `--cache-k all` keeps the teacher's whole vocabulary in float32,
               where the cached path trains like the live one: its rows should match uld / hybrid closely.
Prints one row per model: exact match and ROUGE-L on the held-out phrasings (greedy), domain perplexity, wall time;
each row as its run ends, the table at the end (every seed's rows in OUT/rows.json). `--seeds N` repeats it all,
teacher included, with other model inits and training order (seeds 0..N-1, same data): cells are then the mean
(min-max).
Every run goes through run_pipeline, as a user's does.

    .venv/bin/python bench/cross_tokenizer.py [--full] [--steps N] [--cache-k K [K ...]] [--seeds N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from lmdistill.config import config_from_dict
from lmdistill.demo.corpus import write_demo_data
from lmdistill.demo.recipe import demo_recipe
from lmdistill.models.tiny import tiny_causal_lm, train_metaspace_tokenizer, train_tokenizer
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.teacher_commands import cache_teacher


def _texts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r.get("text") or f"{r.get('prompt', '')} {r.get('completion', '')}" for r in rows]


def _config(model: Path, out: Path, files: dict, recipe, eval_rows: int, seed: int, sources: dict,
            stages: list[dict], **extra) -> dict:
    return {
        "task_type": "causal", "student": {"name": str(model)},
        "data": {"max_length": 96, "sources": sources,
                 "eval": {"domain": {"path": str(files["domain_eval"]), "max_rows": eval_rows}}},
        "training": {"batch_size": recipe.batch_size, "learning_rate": recipe.student_lr, "warmup_ratio": 0.1,
                     "lr_scheduler_type": "cosine", "logging_steps": 50, "report_to": [], "eval_batch_size": 64,
                     "save_total_limit": 1, "seed": 42 + seed},
        "generation": {"max_new_tokens": recipe.max_new_tokens, "do_sample": False, "batch_size": 64},
        "evaluation": {"num_samples": 0, "max_prompts": eval_rows, "measure_speed": False, "report": False},
        "output_dir": str(out), "stages": stages, **extra,
    }


def _scores(run_dir: Path, role: str = "student_after") -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())[role]
    pick = {"exact_match": "exact_match", "rouge_l": "rouge_l", "ppl": "perplexity/domain"}
    return {name: metrics.get(key) for name, key in pick.items()}


def _cache_k(value: str) -> str:
    if value != "all" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"--cache-k takes positive integers or 'all', got {value!r}")
    return value


def _cells(values: list[float | None]) -> str:
    """One seed's value, or the mean over seeds with their range."""
    if any(v is None for v in values):
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def _table(runs: list[dict]) -> str:
    """Rows of the first seed's runs; with several seeds, each cell is the mean (min-max), seconds the mean."""
    lines = ["| model | exact match | ROUGE-L | domain ppl | seconds |", "|---|---|---|---|---|"]
    for name in runs[0]:
        cells = [_cells([rows[name][k] for rows in runs]) for k in ("exact_match", "rouge_l", "ppl")]
        seconds = sum(rows[name]["seconds"] for rows in runs) / len(runs)
        lines.append(f"| {name} | {' | '.join(cells)} | {seconds:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the demo's full sizes (default: its quick ones)")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the recipe's total)")
    parser.add_argument("--cache-k", nargs="+", type=_cache_k, default=["64"], metavar="K",
                        help="teacher_cache.k of the cached rows, a pair of rows per value; 'all': the teacher's "
                             "whole vocabulary in float32 (the cached path then equals the live one)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1, one after another (model inits and "
                                                               "training order; same data); the table gives means")
    parser.add_argument("--out", default="bench_out/cross_tokenizer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = demo_recipe(quick=not args.full)
    steps = args.steps or sum(stage.steps for stage in recipe.stages)
    out, eval_rows = Path(args.out), 60 if not args.full else 150
    runs = []
    for seed in range(args.seeds):
        runs.append(_run_seed(args, recipe, steps, eval_rows, seed, out / f"seed{seed}" if args.seeds > 1 else out))
        (out / "rows.json").write_text(json.dumps(runs, indent=1))
    print(f"\n{steps} student steps, batch {recipe.batch_size}, eval on {eval_rows} held-out phrasings, "
          f"{args.seeds} seed(s)\n")
    print(_table(runs))


def _run_seed(args, recipe, steps: int, eval_rows: int, seed: int, out: Path) -> dict:
    """Every row's scores and seconds for one seed, each printed as its run ends."""
    files = write_demo_data(out / "data", quick=not args.full)
    texts = _texts(files["general_train"]) + _texts(files["domain_docs"]) + _texts(files["domain_qa_teacher"])
    models, vocab = {}, {}
    for role, tokenizer, size, init in (
            ("teacher", train_metaspace_tokenizer(texts, vocab_size=recipe.vocab_size), recipe.teacher, 1),
            ("student", train_tokenizer(texts, vocab_size=recipe.vocab_size), recipe.student, 2)):
        models[role] = out / "init" / role
        tiny_causal_lm(len(tokenizer), size.layers, size.hidden, seed=init + 2 * seed,
                       max_position_embeddings=160).save_pretrained(models[role])
        tokenizer.save_pretrained(models[role])
        vocab[role] = len(tokenizer)
    rows, started = {}, time.perf_counter()

    teacher_sources = {name: {"path": str(files[name])} for name in recipe.teacher_mix}
    cfg = _config(models["teacher"], out / "teacher", files, recipe, eval_rows, seed, teacher_sources,
                  [{"name": "teacher", "kind": "finetune", "max_steps": recipe.teacher_steps,
                    "losses": [{"name": "cross_entropy"}],
                    "mixture": {"weights": recipe.teacher_mix}}])
    cfg["training"]["learning_rate"] = recipe.teacher_lr
    teacher = run_pipeline(config_from_dict(cfg, "teacher")) / "final"
    rows["teacher (metaspace)"] = _scores(out / "teacher") | {"seconds": time.perf_counter() - started}
    print(f"seed {seed} teacher: {rows['teacher (metaspace)']}", flush=True)

    every_prompt = {"domain": {"path": str(files["domain_qa_teacher"])}}  # the teacher answers; labels unused
    generations = out / "generations.jsonl"
    students = {
        "ce": ({"domain": {"path": str(files["domain_qa_labelled"])}},
               [{"name": "s", "kind": "finetune", "max_steps": steps,
                 "losses": [{"name": "cross_entropy"}]}]),
        "seq_kd": (every_prompt, [{"name": "s", "kind": "non_policy", "max_steps": steps,
                                   "losses": [{"name": "cross_entropy"}]}]),
    }
    for name, (sources, stages) in students.items():
        begin = time.perf_counter()
        cfg = _config(models["student"], out / name, files, recipe, eval_rows, seed, sources, stages,
                      teacher={"name": str(teacher)})
        cfg["generation"]["path"] = str(generations)
        run_pipeline(config_from_dict(cfg, name))
        rows[name] = _scores(out / name) | {"seconds": time.perf_counter() - begin}
        print(f"seed {seed} {name}: {rows[name]}", flush=True)

    # The teacher's answers as prompt/completion rows: the text the logit-KD students train on.
    teacher_text = out / "data" / "teacher_answers.jsonl"
    teacher_text.write_text("".join(
        json.dumps({"prompt": line["messages"][-1]["content"], "completion": line["completion"]}) + "\n"
        for line in map(json.loads, generations.read_text().splitlines()) if line["completion"].strip()))
    # One cache per k ('all': the teacher's whole vocabulary, float32), made by this run's teacher.
    caches = [{"k": vocab["teacher"], "dtype": "float32"} if k == "all" else {"k": int(k)} for k in args.cache_k]
    for cache in caches:
        cache["path"] = str(out / f"teacher_cache_k{cache['k']}")
        shutil.rmtree(cache["path"], ignore_errors=True)
    for loss, live in (("uld", "uld"), ("cross_vocab_kl", "hybrid")):
        for cache in [None, *caches]:
            name = live if cache is None else f"{live}_cached_k{cache['k']}"
            begin = time.perf_counter()
            cfg = _config(models["student"], out / name, files, recipe, eval_rows, seed,
                          {"domain": {"path": str(teacher_text)}},
                          [{"name": "s", "max_steps": steps, "teacher_source": "live" if cache is None else "cache",
                            "losses": [{"name": "cross_entropy"}, {"name": loss}]}],
                          teacher={"name": str(teacher)}, **({} if cache is None else {"teacher_cache": cache}))
            config = config_from_dict(cfg, name)
            if cache is not None:
                cache_teacher(config)  # captured for the uld run; the cross_vocab_kl run finds it complete
                print(f"seed {seed} {name}: cache ready after {time.perf_counter() - begin:.0f} s", flush=True)
            run_pipeline(config)
            rows[name] = _scores(out / name) | {"seconds": time.perf_counter() - begin}
            print(f"seed {seed} {name}: {rows[name]}", flush=True)

    return rows


if __name__ == "__main__":
    main()
