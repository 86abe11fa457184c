"""`lmdistill demo`: the whole job on a shipped task, with no hub and no GPU.

    data      finance facts + general text, generated (lmdistill.demo.corpus)
    teacher   a 4-layer model trained (CE) on everything: general text, company documents, QA on every company
    labels    the teacher answers the unlabelled domain prompts (sequence-level KD data)
    distill   a ~5x smaller student through 3 stages: general KD -> documents 30% -> 70% -> domain QA + KD
    baseline  the same student size, same stages and steps, CE only, without the teacher
    report    teacher / student before / distilled / baseline on held-out domain questions and general text
Every step goes through the same pipeline and files a user's run does.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmdistill.config import config_from_dict
from lmdistill.demo.corpus import write_demo_data
from lmdistill.models.tiny import tiny_causal_lm, train_tokenizer
from lmdistill.train.pipeline import run_pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    vocab: int
    teacher: tuple[int, int]  # layers, hidden
    student: tuple[int, int]
    teacher_steps: int
    stage_steps: tuple[int, int, int]
    batch: int
    teacher_lr: float
    student_lr: float
    max_length: int = 64


FULL = Recipe(vocab=1024, teacher=(4, 256), student=(2, 96), teacher_steps=1200, stage_steps=(150, 300, 350),
              batch=32, teacher_lr=1e-3, student_lr=2e-3)
QUICK = Recipe(vocab=512, teacher=(2, 128), student=(2, 48), teacher_steps=150, stage_steps=(20, 30, 40),
               batch=16, teacher_lr=2e-3, student_lr=3e-3)


def _texts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r.get("text") or f"{r.get('prompt', '')} {r.get('completion', '')}" for r in rows]


def _base(recipe: Recipe, out: Path, files: dict[str, Path], student_dir: Path) -> dict:
    return {
        "task_type": "causal",
        "student": {"name": str(student_dir)},
        "data": {"max_length": recipe.max_length, "eval_max_rows": 150,
                 "eval": {"domain": {"path": str(files["domain_eval"])},
                          "general": {"path": str(files["general_eval"]), "max_rows": 100}}},
        "training": {"batch_size": recipe.batch, "learning_rate": recipe.student_lr, "warmup_ratio": 0.05,
                     "lr_scheduler_type": "cosine", "logging_steps": 10, "report_to": [], "eval_batch_size": 32,
                     "save_total_limit": 1},
        "generation": {"max_new_tokens": 12},
        "evaluation": {"num_samples": 3, "max_prompts": 150, "measure_speed": True},
        "output_dir": str(out),
    }


def _stages(recipe: Recipe, distill: bool) -> list[dict]:
    s1, s2, s3 = recipe.stage_steps
    kd = (lambda ce, t: [{"name": "forward_kl", "weight": 1 - ce}, {"name": "cross_entropy", "weight": ce}]) if distill \
        else (lambda ce, t: [{"name": "cross_entropy"}])
    kind = "distill" if distill else "finetune"
    domain = {"labelled": 1.0, "teacher_answers": 1.0} if distill else {"labelled": 1.0}
    return [
        {"name": "stage1", "kind": kind, "max_steps": s1, "temperature": 2.0, "losses": kd(0.2, 2.0),
         "mixture": {"weights": {"general": 1.0}}},
        {"name": "stage2", "kind": kind, "max_steps": s2, "temperature": 2.0, "losses": kd(0.3, 2.0),
         "mixture": {"weights": {"general": 1.0, "docs": 1.0},
                     "schedule": {"kind": "linear", "source": "docs", "start": 0.3, "end": 0.7}}},
        {"name": "stage3", "kind": kind, "max_steps": s3, "temperature": 1.0, "losses": kd(0.5, 1.0),
         "mixture": {"weights": {**domain, "docs": 0.3}}},
    ]


def run_demo(out_dir: str | Path = "demo_out", quick: bool = False) -> Path:
    start = time.perf_counter()
    recipe = QUICK if quick else FULL
    out = Path(out_dir)
    files = write_demo_data(out / "data", quick=quick)
    torch.manual_seed(0)
    texts = _texts(files["general_train"]) + _texts(files["domain_docs"]) + _texts(files["domain_qa_teacher"])
    tokenizer = train_tokenizer(texts, vocab_size=recipe.vocab)
    inits = {}
    for role, (layers, hidden), seed in (("teacher", recipe.teacher, 1), ("student", recipe.student, 2)):
        inits[role] = out / "init" / role
        tiny_causal_lm(len(tokenizer), layers, hidden, seed=seed, max_position_embeddings=128).save_pretrained(inits[role])
        tokenizer.save_pretrained(inits[role])

    log.info("demo 1/4: training the teacher %dx%d", *recipe.teacher)
    teacher_cfg = _base(recipe, out / "teacher", files, inits["teacher"])
    teacher_cfg["data"]["sources"] = {"general": {"path": str(files["general_train"])},
                                      "docs": {"path": str(files["domain_docs"])},
                                      "qa": {"path": str(files["domain_qa_teacher"])}}
    teacher_cfg["training"]["learning_rate"] = recipe.teacher_lr
    teacher_cfg["stages"] = [{"name": "teacher", "kind": "finetune", "max_steps": recipe.teacher_steps,
                              "losses": [{"name": "cross_entropy"}]}]
    teacher_cfg["evaluation"] = {"num_samples": 0, "max_prompts": 150, "measure_speed": False, "report": False}
    teacher_dir = run_pipeline(config_from_dict(teacher_cfg, "demo teacher")) / "final"

    log.info("demo 2/4: the teacher answers the unlabelled domain prompts")
    answers = out / "data" / "teacher_answers.jsonl"
    _teacher_answers(teacher_dir, files["domain_prompts_unlabelled"], answers, recipe)

    sources = {"general": {"path": str(files["general_train"])}, "docs": {"path": str(files["domain_docs"])},
               "labelled": {"path": str(files["domain_qa_labelled"])}, "teacher_answers": {"path": str(answers)}}
    log.info("demo 3/4: distilling a %dx%d student through 3 stages", *recipe.student)
    distill_cfg = _base(recipe, out / "distilled", files, inits["student"])
    distill_cfg["teacher"] = {"name": str(teacher_dir)}
    distill_cfg["data"]["sources"] = sources
    distill_cfg["stages"] = _stages(recipe, distill=True)
    run_dir = run_pipeline(config_from_dict(distill_cfg, "demo distill"))

    log.info("demo 4/4: the CE-only baseline (same size, stages and steps; no teacher)")
    baseline_cfg = _base(recipe, out / "baseline", files, inits["student"])
    baseline_cfg["data"]["sources"] = {k: v for k, v in sources.items() if k != "teacher_answers"}
    baseline_cfg["stages"] = _stages(recipe, distill=False)
    baseline_cfg["evaluation"] = {"num_samples": 0, "max_prompts": 150, "measure_speed": True, "report": False}
    baseline_dir = run_pipeline(config_from_dict(baseline_cfg, "demo baseline"))
    _merge_baseline(run_dir, baseline_dir)
    log.info("demo done in %.0f s: %s", time.perf_counter() - start, run_dir / "report.html")
    return run_dir


def _teacher_answers(teacher_dir: Path, prompts_file: Path, out_file: Path, recipe: Recipe) -> None:
    """Greedy teacher answers to the unlabelled prompts, as prompt/completion rows the data layer reads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmdistill.eval.metrics import generate_continuations

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]
    answers = generate_continuations(model, tokenizer, chat, max_new_tokens=12, batch_size=64)
    out_file.write_text("".join(json.dumps({"prompt": p, "completion": a.strip()}) + "\n"
                                for p, a in zip(prompts, answers) if a.strip()))


def _merge_baseline(run_dir: Path, baseline_dir: Path) -> None:
    """Put the baseline's final scores beside the distilled run's, then redraw the report."""
    from lmdistill.eval.evaluate import read_metrics, write_metrics
    from lmdistill.eval.report import write_report

    baseline = read_metrics(baseline_dir).get("student_after")
    if baseline:
        write_metrics(run_dir, {"baseline": baseline})
    write_report(run_dir)
