"""Which objective wins: one student per distillation method, same start, data order, steps and learning rate.

    python bench/ordering.py [--teacher DIR --train FILE --eval FILE] [--student-layers N | --student DIR]
                             [--seeds 3] [--steps S] [--out DIR] [--demo-size full|quick] [--quick]

With no paths it runs on the embedded demo task (`lmdistill demo`'s data, its teacher trained here first, its student
size; held-out question phrasings as the eval set). With paths: a causal teacher folder whose tokenizer has a chat
template, and prompt/completion JSONL files (train: gold answers; eval: held-out prompts and gold answers).

Methods, each a stage config written here and run through `run_pipeline` (the same code as `lmdistill train`):
  sft       CE on the gold answers (no teacher)        kd        forward KL + CE (alpha 0.5), classic word-level KD
  seqkd     CE on the teacher's greedy answers          rkl       reverse KL (MiniLLM's token-level objective)
  jsd       JSD(0.5)                                    tvd       total variation distance
  skl       skew KL (0.1)                               srkl      skew reverse KL (0.1), DistiLLM's loss
  gkd       on-policy, lmbda 0.5, JSD(0.5) (GKD)
  distillm  skew reverse KL (0.1) + adaptive off-policy data: the student-sample share starts at 0 and rises by 0.1
            whenever validation loss (on rows held out of --train) stops falling, with a replay buffer
Scores on the eval prompts (greedy, chat template): ROUGE-L and exact match against the gold answers, ROUGE-L against
the teacher's answers; the teacher's own scores; wall seconds per method (training + scoring). Written to --out as
results.json, results.md and results.png (mean +- std over seeds; a table per seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from lmdistill.config import config_from_dict
from lmdistill.demo.demo import build_demo_teacher, greedy_answers
from lmdistill.eval.metrics import exact_match, rouge_l
from lmdistill.train.pipeline import run_pipeline

log = logging.getLogger("bench.ordering")

KD = [{"name": "forward_kl"}]
METHODS: dict[str, dict] = {
    "sft": {"kind": "finetune", "losses": [{"name": "cross_entropy"}]},
    "kd": {"losses": KD, "alpha": 0.5},
    "seqkd": {"kind": "finetune", "losses": [{"name": "cross_entropy"}], "source": "teacher_answers"},
    "rkl": {"losses": [{"name": "reverse_kl"}]},
    "jsd": {"losses": [{"name": "jsd", "beta": 0.5}]},
    "tvd": {"losses": [{"name": "tvd"}]},
    "skl": {"losses": [{"name": "skew_kl", "skew": 0.1}]},
    "srkl": {"losses": [{"name": "skew_reverse_kl", "skew": 0.1}]},
    "gkd": {"kind": "policy", "losses": [{"name": "jsd", "beta": 0.5}], "onpolicy": {"lmbda": 0.5}},
    "distillm": {"kind": "policy", "losses": [{"name": "skew_reverse_kl", "skew": 0.1}],
                 "onpolicy": {"replay_size": 8, "replay_ratio": 0.5,
                              "adaptive": {"start": 0.0, "step": 0.1, "max": 1.0}}},
}
SCORES = ("rougeL_gold", "exact_match_gold", "rougeL_teacher")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare_files(train: Path, eval_file: Path, teacher: Path, out: Path, valid_rows: int, eval_rows: int,
                  max_new_tokens: int) -> dict:
    """Split validation rows off --train, answer the train prompts with the teacher (SeqKD's data) and the eval
    prompts (the teacher's scores and the reference for ROUGE-L vs teacher)."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = _rows(train)
    if len(rows) <= valid_rows or any("prompt" not in r or "completion" not in r for r in rows):
        raise SystemExit(f"--train {train}: needs prompt/completion rows, more than the {valid_rows} held out for "
                         "validation")
    valid, rows = rows[:valid_rows], rows[valid_rows:]
    answers = greedy_answers(teacher, [r["prompt"] for r in rows], max_new_tokens)
    # Rows the teacher left empty are dropped: an empty completion trains nothing.
    seqkd = [{"prompt": r["prompt"], "completion": a} for r, a in zip(rows, answers) if a]
    evals = _rows(eval_file)[:eval_rows]
    teacher_eval = greedy_answers(teacher, [r["prompt"] for r in evals], max_new_tokens)
    return {"train": _write_rows(data / "train.jsonl", rows), "valid": _write_rows(data / "valid.jsonl", valid),
            "teacher_answers": _write_rows(data / "seqkd.jsonl", seqkd), "eval": evals,
            "teacher_eval": teacher_eval}


def method_config(method: str, files: dict, args, seed: int, out: Path) -> dict:
    """The pipeline config that trains `method`'s student: everything but the stage is the same for all methods."""
    settings = dict(METHODS[method])
    source = settings.pop("source", "train")
    student = {"from_teacher": {"num_layers": args.student_layers}} if args.student_layers else {
        "name": str(args.student)}
    stage = {"name": method, "max_steps": args.steps, "mixture": {"weights": {source: 1.0}}, **settings}
    if "adaptive" in stage.get("onpolicy", {}):
        stage["eval_steps"] = max(1, args.steps // 10)
    return {
        "task_type": "causal", "teacher": {"name": str(args.teacher)}, "student": student,
        "data": {"max_length": args.max_length, "sources": {source: {"path": str(files[source])}},
                 "eval": {"valid": {"path": str(files["valid"])}}},
        "training": {"batch_size": args.batch_size, "learning_rate": args.lr, "lr_scheduler_type": "constant",
                     "seed": seed, "logging_steps": 10, "report_to": [], "eval_batch_size": 32,
                     "save_total_limit": 1},
        "generation": {"max_new_tokens": args.max_new_tokens},
        "evaluation": {"enabled": False, "report": False},
        "output_dir": str(out / f"seed{seed}" / method),
        "stages": [stage],
    }


def score(answers: list[str], evals: list[dict], teacher_answers: list[str]) -> dict[str, float]:
    gold = [r["completion"] for r in evals]
    return {"rougeL_gold": rouge_l(answers, gold), "exact_match_gold": exact_match(answers, gold),
            "rougeL_teacher": rouge_l(answers, teacher_answers)}


def run_method(method: str, files: dict, args, seed: int, out: Path) -> dict[str, float]:
    start = time.perf_counter()
    run_dir = run_pipeline(config_from_dict(method_config(method, files, args, seed, out), f"bench {method}"),
                           restart=True)
    answers = greedy_answers(run_dir / "final", [r["prompt"] for r in files["eval"]], args.max_new_tokens)
    return {**score(answers, files["eval"], files["teacher_eval"]), "seconds": time.perf_counter() - start}


def summarise(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean and (sample) std over seeds of every score, per method; std 0 with one seed."""
    methods = next(iter(per_seed.values())).keys()
    summary = {}
    for method in methods:
        row = {}
        for key in (*SCORES, "seconds"):
            values = [per_seed[seed][method][key] for seed in per_seed]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[method] = row
    return summary


def markdown(summary: dict, per_seed: dict, teacher: dict[str, float], command: str, warm_steps: int) -> str:
    head = "| method | ROUGE-L (gold) | exact match (gold) | ROUGE-L (teacher) | seconds |\n|---|---|---|---|---|\n"
    start = f"an SFT student ({warm_steps} CE steps on gold)" if warm_steps else "the initial student"
    lines = [f"Command: `{command}`", f"Seeds: {len(per_seed)}; every method starts from {start}", "",
             "Mean +- std over seeds:", "", head.rstrip()]
    for method, row in summary.items():
        lines.append(f"| {method} | " + " | ".join(f"{row[k]:.3f} +- {row[k + '_std']:.3f}" for k in SCORES)
                     + f" | {row['seconds']:.0f} |")
    lines.append(f"| teacher | {teacher['rougeL_gold']:.3f} | {teacher['exact_match_gold']:.3f} | 1.000 | |")
    for seed, rows in per_seed.items():
        lines += ["", f"Seed {seed}:", "", head.rstrip()]
        lines += [f"| {m} | " + " | ".join(f"{r[k]:.3f}" for k in SCORES) + f" | {r['seconds']:.0f} |"
                  for m, r in rows.items()]
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict, teacher: dict[str, float], path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot()
    methods, width = list(summary), 0.27
    for i, key in enumerate(SCORES):
        xs = [m + (i - 1) * width for m in range(len(methods))]
        ax.bar(xs, [summary[m][key] for m in methods], width, yerr=[summary[m][f"{key}_std"] for m in methods],
               label=key, capsize=2)
    ax.axhline(teacher["rougeL_gold"], color="grey", linestyle="--", linewidth=1, label="teacher ROUGE-L (gold)")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, help="teacher model folder (default: the demo's, trained here)")
    parser.add_argument("--train", type=Path, help="prompt/completion JSONL with gold answers")
    parser.add_argument("--eval", type=Path, help="prompt/completion JSONL of held-out prompts")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--student-layers", type=int, help="student = the teacher with N evenly spaced layers")
    group.add_argument("--student", type=Path, help="student model folder (its initial weights)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate (the default suits the tiny demo "
                                                              "models; real models want ~1e-5 to 5e-5)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="answer length (demo: its own; else 64)")
    parser.add_argument("--max-length", type=int, default=96, help="tokens per training row")
    parser.add_argument("--eval-rows", type=int, default=300, help="eval prompts scored")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--warm-steps", type=int, default=0,
                        help="first fine-tune the student on the gold answers (CE) for this many steps and start every "
                             "method from it, as MiniLLM and DistiLLM start from an SFT student (mode-seeking losses "
                             "collapse from a random one); 0: every method starts from the initial student")
    parser.add_argument("--demo-size", choices=("full", "quick"), default="full",
                        help="the embedded task's size: `lmdistill demo`'s full or --quick data and teacher")
    parser.add_argument("--out", type=Path, default=Path("ordering_out"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 4 steps (2 warm at most), batch 4, "
                                                             "8 eval prompts (with the demo: its quick teacher)")
    args = parser.parse_args(argv)
    paths = [args.teacher, args.train, args.eval]
    if any(paths) and not all(paths):
        parser.error("give --teacher, --train and --eval together (or none of them for the embedded demo task)")
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    if args.quick:
        args.seeds, args.steps, args.batch_size, args.eval_rows = 1, 4, 4, 8
        args.warm_steps = min(args.warm_steps, 2)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.teacher is None:
        recipe, demo_files, inits, args.teacher = build_demo_teacher(args.out / "demo",
                                                                         args.quick or args.demo_size == "quick")
        args.train, args.eval = demo_files["domain_qa_teacher"], demo_files["domain_eval"]
        if not args.student_layers and not args.student:
            args.student = inits["student"]
        args.max_new_tokens = args.max_new_tokens or recipe.max_new_tokens
    elif not args.student_layers and not args.student:
        raise SystemExit("with --teacher, give --student-layers N or --student DIR")
    args.max_new_tokens = args.max_new_tokens or 64
    files = prepare_files(args.train, args.eval, args.teacher, args.out, valid_rows=8 if args.quick else 64,
                          eval_rows=args.eval_rows, max_new_tokens=args.max_new_tokens)
    teacher = score(files["teacher_eval"], files["eval"], files["teacher_eval"])
    if args.warm_steps:
        warm = method_config("sft", files, args, seed=0, out=args.out)
        warm["stages"][0].update(name="warm", max_steps=args.warm_steps)
        warm["output_dir"] = str(args.out / "warm")
        args.student = run_pipeline(config_from_dict(warm, "bench warm start"), restart=True) / "final"
        args.student_layers = None
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for seed in range(args.seeds):
        per_seed[seed] = {}
        for method in args.methods.split(","):
            per_seed[seed][method] = run_method(method, files, args, seed, args.out)
            log.info("seed %d %s: %s", seed, method, per_seed[seed][method])
    summary = summarise(per_seed)
    command = "python bench/ordering.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"command": command, "seeds": args.seeds, "steps": args.steps, "warm_steps": args.warm_steps,
               "teacher": teacher,
               "summary": summary, "per_seed": per_seed}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(summary, per_seed, teacher, command, args.warm_steps))
    bar_chart(summary, teacher, args.out / "results.png")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main()
