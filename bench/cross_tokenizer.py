"""Cross-tokenizer distillation on the embedded demo task: which path teaches the student most?

The teacher speaks a SentencePiece-style tokenizer (metaspace, byte fallback, BOS, Zephyr-style template), the
student a byte-level BPE (no BOS, ChatML template), both trained here on the demo's texts. The teacher learns every
company's facts (CE on the demo's teacher mix); then four students of one size train the same number of steps:
  ce           CE on the labelled QA only (a fifth of the companies), no teacher;
  seq_kd       sequence-level KD: CE on the teacher's greedy answers to every company's training prompts;
  uld          the same teacher text, CE + uld against the live teacher at aligned positions;
  hybrid       the same teacher text, CE + cross_vocab_kl (shared-vocabulary KL + ULD on the rest);
  uld_cached, hybrid_cached   the same two from a teacher cache across tokenizers (teacher_cache.k, 64 by
               default): `cache-teacher` once (its time counts in uld_cached's seconds), then no teacher in memory.
Prints one row per model: exact match and ROUGE-L on the held-out phrasings (greedy), domain perplexity, wall time.
Every run goes through run_pipeline, as a user's does.

    .venv/bin/python bench/cross_tokenizer.py [--full] [--steps N] [--out DIR]
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


def _config(model: Path, out: Path, files: dict, recipe, eval_rows: int, sources: dict, stages: list[dict],
            **extra) -> dict:
    return {
        "task_type": "causal", "student": {"name": str(model)},
        "data": {"max_length": 96, "sources": sources,
                 "eval": {"domain": {"path": str(files["domain_eval"]), "max_rows": eval_rows}}},
        "training": {"batch_size": recipe.batch_size, "learning_rate": recipe.student_lr, "warmup_ratio": 0.1,
                     "lr_scheduler_type": "cosine", "logging_steps": 50, "report_to": [], "eval_batch_size": 64,
                     "save_total_limit": 1},
        "generation": {"max_new_tokens": recipe.max_new_tokens, "do_sample": False, "batch_size": 64},
        "evaluation": {"num_samples": 0, "max_prompts": eval_rows, "measure_speed": False, "report": False},
        "output_dir": str(out), "stages": stages, **extra,
    }


def _scores(run_dir: Path, role: str = "student_after") -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())[role]
    pick = {"exact_match": "exact_match", "rouge_l": "rouge_l", "ppl": "perplexity/domain"}
    return {name: metrics.get(key) for name, key in pick.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the demo's full sizes (default: its quick ones)")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: the recipe's total)")
    parser.add_argument("--out", default="bench_out/cross_tokenizer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = demo_recipe(quick=not args.full)
    steps = args.steps or sum(stage.steps for stage in recipe.stages)
    out = Path(args.out)
    files = write_demo_data(out / "data", quick=not args.full)
    eval_rows = 60 if not args.full else 150
    texts = _texts(files["general_train"]) + _texts(files["domain_docs"]) + _texts(files["domain_qa_teacher"])
    models = {}
    for role, tokenizer, size, seed in (
            ("teacher", train_metaspace_tokenizer(texts, vocab_size=recipe.vocab_size), recipe.teacher, 1),
            ("student", train_tokenizer(texts, vocab_size=recipe.vocab_size), recipe.student, 2)):
        models[role] = out / "init" / role
        tiny_causal_lm(len(tokenizer), size.layers, size.hidden, seed=seed,
                       max_position_embeddings=160).save_pretrained(models[role])
        tokenizer.save_pretrained(models[role])
    rows, started = {}, time.perf_counter()

    teacher_sources = {name: {"path": str(files[name])} for name in recipe.teacher_mix}
    cfg = _config(models["teacher"], out / "teacher", files, recipe, eval_rows, teacher_sources,
                  [{"name": "teacher", "kind": "finetune", "max_steps": recipe.teacher_steps,
                    "losses": [{"name": "cross_entropy"}],
                    "mixture": {"weights": recipe.teacher_mix}}])
    cfg["training"]["learning_rate"] = recipe.teacher_lr
    teacher = run_pipeline(config_from_dict(cfg, "teacher")) / "final"
    rows["teacher (metaspace)"] = _scores(out / "teacher") | {"seconds": time.perf_counter() - started}

    every_prompt = {"domain": {"path": str(files["domain_qa_teacher"])}}  # the teacher answers; labels unused
    generations = out / "generations.jsonl"
    runs = {
        "ce": ({"domain": {"path": str(files["domain_qa_labelled"])}},
               [{"name": "s", "kind": "finetune", "max_steps": steps,
                 "losses": [{"name": "cross_entropy"}]}]),
        "seq_kd": (every_prompt, [{"name": "s", "kind": "non_policy", "max_steps": steps,
                                   "losses": [{"name": "cross_entropy"}]}]),
    }
    for name, (sources, stages) in runs.items():
        begin = time.perf_counter()
        cfg = _config(models["student"], out / name, files, recipe, eval_rows, sources, stages,
                      teacher={"name": str(teacher)})
        cfg["generation"]["path"] = str(generations)
        run_pipeline(config_from_dict(cfg, name))
        rows[name] = _scores(out / name) | {"seconds": time.perf_counter() - begin}

    # The teacher's answers as prompt/completion rows: the text the logit-KD students train on.
    teacher_text = out / "data" / "teacher_answers.jsonl"
    teacher_text.write_text("".join(
        json.dumps({"prompt": line["messages"][-1]["content"], "completion": line["completion"]}) + "\n"
        for line in map(json.loads, generations.read_text().splitlines()) if line["completion"].strip()))
    shutil.rmtree(out / "teacher_cache", ignore_errors=True)  # made by this run's teacher, not an earlier one's
    for name, loss, source in (("uld", "uld", "live"), ("hybrid", "cross_vocab_kl", "live"),
                               ("uld_cached", "uld", "cache"), ("hybrid_cached", "cross_vocab_kl", "cache")):
        begin = time.perf_counter()
        cfg = _config(models["student"], out / name, files, recipe, eval_rows,
                      {"domain": {"path": str(teacher_text)}},
                      [{"name": "s", "max_steps": steps, "teacher_source": source,
                        "losses": [{"name": "cross_entropy"}, {"name": loss}]}],
                      teacher={"name": str(teacher)}, teacher_cache={"path": str(out / "teacher_cache")})
        config = config_from_dict(cfg, name)
        if source == "cache":
            cache_teacher(config)  # captured for the first cached run; the second finds it complete
        run_pipeline(config)
        rows[name] = _scores(out / name) | {"seconds": time.perf_counter() - begin}

    print(f"\n{steps} student steps, batch {recipe.batch_size}, eval on {eval_rows} held-out phrasings\n")
    print("| model | exact match | ROUGE-L | domain ppl | seconds |\n|---|---|---|---|---|")
    for name, row in rows.items():
        cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else "-" for k in ("exact_match", "rouge_l", "ppl")]
        print(f"| {name} | {' | '.join(cells)} | {row['seconds']:.0f} |")


if __name__ == "__main__":
    main()
