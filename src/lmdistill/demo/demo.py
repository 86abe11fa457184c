"""`lmdistill demo`: the whole job on a shipped task, with no hub and no GPU.

    data      finance facts + general text, generated (lmdistill.demo.corpus)
    teacher   a 4-layer model trained (CE) on everything: general text, company documents, QA on every company
    labels    the student has labelled QA for a fifth of the companies; the teacher answers the others' questions
    distill   a ~5x smaller student through 3 stages (alpha*CE + (1-alpha)*T^2*KL): general KD -> domain share
              30% -> 70% -> domain (90%, a tenth of general text kept)
    baseline  the same student size, same stages and steps, CE only on the labelled fifth, no teacher
    seeds     with --seeds K, the distilled student and the baseline are trained again for each of K training seeds
              (the teacher once): the report shows mean +- std over them
    report    teacher / student before / distilled / baseline on held-out domain questions and general text
Settings: lmdistill.demo.recipe (calibrated by bench/demo_calibration.py).
Every step goes through the same pipeline and files a user's run does.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from lmdistill.config import TrainingSettings, config_from_dict
from lmdistill.demo.corpus import write_demo_data
from lmdistill.demo.recipe import DemoRecipe, demo_recipe
from lmdistill.models.tiny import tiny_causal_lm, train_tokenizer
from lmdistill.train.pipeline import run_pipeline

log = logging.getLogger(__name__)
GENERAL_KEPT = 0.9  # the largest domain share of a student stage
# The pipeline's own default training.seed: the seed the recipe was calibrated and the README's table measured with.
DEFAULT_SEED = TrainingSettings.model_fields["seed"].default
MORE_SEEDS = "more_seeds"  # the folder under the demo's output holding the runs of every seed after the first


def _texts(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r.get("text") or f"{r.get('prompt', '')} {r.get('completion', '')}" for r in rows]


def _base(recipe: DemoRecipe, out: Path, files: dict[str, Path], student_dir: Path, quick: bool, seed: int) -> dict:
    eval_rows = 150 if quick else 300
    return {
        "task_type": "causal",
        "student": {"name": str(student_dir)},
        "data": {"max_length": 96, "eval_max_rows": eval_rows,
                 "eval": {"domain": {"path": str(files["domain_eval"])},
                          "general": {"path": str(files["general_eval"]), "max_rows": 100}}},
        "training": {"batch_size": recipe.batch_size, "learning_rate": recipe.student_lr,
                     "warmup_ratio": recipe.warmup_ratio, "lr_scheduler_type": "cosine", "logging_steps": 10,
                     "report_to": [], "eval_batch_size": 64, "save_total_limit": 1, "seed": seed},
        "generation": {"max_new_tokens": recipe.max_new_tokens},
        "evaluation": {"num_samples": 3, "max_prompts": eval_rows, "measure_speed": True},
        "output_dir": str(out),
    }


def _stages(recipe: DemoRecipe, distill: bool) -> list[dict]:
    """The recipe's stages as pipeline stages; the baseline runs them CE-only (alpha = 1) with no teacher."""
    stages = []
    for index, stage in enumerate(recipe.stages, start=1):
        start, end = stage.domain_share
        # Stage 3 keeps a tenth of general text: domain-only steps were measured to wipe out general perplexity.
        start, end = min(start, GENERAL_KEPT), min(end, GENERAL_KEPT)
        mixture = {"weights": {"general": 1.0}} if end == 0 else {
            "weights": {"general": 1.0, "domain": 1.0},
            "schedule": {"kind": "linear" if start != end else "constant", "source": "domain", "start": start,
                         "end": end}}
        losses = [{"name": "forward_kl"}] if distill else [{"name": "cross_entropy"}]
        settings = {"name": f"stage{index}", "max_steps": stage.steps, "mixture": mixture, "losses": losses}
        if distill:
            settings.update(temperature=stage.temperature, alpha=stage.alpha)
        else:
            settings.update(kind="finetune")
        stages.append(settings)
    return stages


def build_demo_teacher(out: Path, quick: bool, seed: int = DEFAULT_SEED
                       ) -> tuple[DemoRecipe, dict[str, Path], dict[str, Path], Path]:
    """The demo's data, initial models (teacher, student: same tokenizer) and trained teacher, written under `out`;
    `seed` is the teacher's training.seed. Returns (recipe, data files, initial model folders by role, trained
    teacher folder)."""
    recipe = demo_recipe(quick)
    files = write_demo_data(out / "data", quick=quick)
    torch.manual_seed(0)
    texts = _texts(files["general_train"]) + _texts(files["domain_docs"]) + _texts(files["domain_qa_teacher"])
    tokenizer = train_tokenizer(texts, vocab_size=recipe.vocab_size)
    inits = {}
    # Fixed initial weights: they stand for the pretrained checkpoints a user distils, which no seed redraws.
    for role, size, init_seed in (("teacher", recipe.teacher, 1), ("student", recipe.student, 2)):
        inits[role] = out / "init" / role
        tiny_causal_lm(len(tokenizer), size.layers, size.hidden, seed=init_seed,
                       max_position_embeddings=128).save_pretrained(inits[role])
        tokenizer.save_pretrained(inits[role])

    log.info("demo 1/4: training the teacher %dx%d on every company's facts", recipe.teacher.layers,
             recipe.teacher.hidden)
    teacher_cfg = _base(recipe, out / "teacher", files, inits["teacher"], quick, seed)
    teacher_cfg["data"]["sources"] = {name: {"path": str(files[name])} for name in recipe.teacher_mix}
    teacher_cfg["training"]["learning_rate"] = recipe.teacher_lr
    teacher_cfg["stages"] = [{"name": "teacher", "kind": "finetune", "max_steps": recipe.teacher_steps,
                              "losses": [{"name": "cross_entropy"}], "mixture": {"weights": recipe.teacher_mix}}]
    teacher_cfg["evaluation"] = {"enabled": False, "report": False}
    # Every demo starts over (its models and data are written anew above; --quick and the full demo differ).
    teacher_dir = run_pipeline(config_from_dict(teacher_cfg, "demo teacher"), restart=True) / "final"
    return recipe, files, inits, teacher_dir


def run_demo(out_dir: str | Path = "demo_out", quick: bool = False, seed: int = DEFAULT_SEED, seeds: int = 1) -> Path:
    """The whole demo under `out_dir`; returns the distilled run's folder (its report.html). `seed` is the training
    seed of the teacher and of the first students; with `seeds` K > 1 the students are trained K times, with
    training seeds seed, seed + 1, ..., and the report shows mean +- std over them (RUN_DIR/seeds.json)."""
    from lmdistill.eval.evaluate import read_metrics
    from lmdistill.eval.report import baseline_verdict, write_report
    from lmdistill.eval.seeds import SeedRuns, write_seed_runs

    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, not {seeds}")
    start = time.perf_counter()
    out = Path(out_dir)
    shutil.rmtree(out / MORE_SEEDS, ignore_errors=True)  # an earlier demo's other seeds: this one starts over too
    recipe, files, inits, teacher_dir = build_demo_teacher(out, quick, seed)

    log.info("demo 2/4: the teacher answers the unlabelled companies' questions")
    answers = _teacher_answers(teacher_dir, files["domain_prompts_unlabelled"], recipe.max_new_tokens)
    distill_domain = out / "data" / "domain_distill.jsonl"
    distill_domain.write_text(files["domain_qa_labelled"].read_text() + answers)

    training_seeds = list(range(seed, seed + seeds))
    run_dirs = []
    for index, training_seed in enumerate(training_seeds):
        if seeds > 1:
            log.info("demo: the students with training seed %d (%d of %d)", training_seed, index + 1, seeds)
        where = out if index == 0 else out / MORE_SEEDS / f"seed{training_seed}"
        run_dirs.append(_students(recipe, where, files, inits["student"], teacher_dir, distill_domain, quick,
                                  training_seed))
    runs = SeedRuns(training_seeds, [read_metrics(d) for d in run_dirs])
    write_seed_runs(run_dirs[0], runs)
    for run_dir in run_dirs:
        write_report(run_dir)
    verdict = baseline_verdict(runs.mean_std()[0], seeds) or ""
    # With several seeds the verdict itself says it is over their means.
    log.info("demo done in %.0f s%s: %s %s", time.perf_counter() - start, "" if seeds > 1 else " (one training seed)",
             verdict, run_dirs[0] / "report.html")
    return run_dirs[0]


def _students(recipe: DemoRecipe, out: Path, files: dict[str, Path], student_init: Path, teacher_dir: Path,
              distill_domain: Path, quick: bool, seed: int) -> Path:
    """The distilled student and the CE-only baseline trained with training seed `seed` under `out`; returns the
    distilled run's folder, whose metrics.json holds the baseline's scores too."""
    log.info("demo 3/4: distilling a %dx%d student through 3 stages", recipe.student.layers, recipe.student.hidden)
    distill_cfg = _base(recipe, out / "distilled", files, student_init, quick, seed)
    distill_cfg["teacher"] = {"name": str(teacher_dir)}
    distill_cfg["data"]["sources"] = {"general": {"path": str(files["general_train"])},
                                      "domain": {"path": str(distill_domain)}}
    distill_cfg["stages"] = _stages(recipe, distill=True)
    run_dir = run_pipeline(config_from_dict(distill_cfg, "demo distill"), restart=True)

    log.info("demo 4/4: the CE-only baseline (same size, stages and steps; labelled companies only)")
    baseline_cfg = _base(recipe, out / "baseline", files, student_init, quick, seed)
    baseline_cfg["data"]["sources"] = {"general": {"path": str(files["general_train"])},
                                       "domain": {"path": str(files["domain_qa_labelled"])}}
    baseline_cfg["stages"] = _stages(recipe, distill=False)
    baseline_cfg["evaluation"].update(num_samples=0, report=False)
    baseline_dir = run_pipeline(config_from_dict(baseline_cfg, "demo baseline"), restart=True)
    _merge_baseline(run_dir, baseline_dir)
    return run_dir


def greedy_answers(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The model's greedy answers to user `prompts` (chat template, cut at <|im_end|>, stripped)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmdistill.eval.metrics import generate_continuations

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]
    answers = generate_continuations(model, tokenizer, chat, max_new_tokens=max_new_tokens, batch_size=64)
    return [a.split("<|im_end|>")[0].strip() for a in answers]


def _teacher_answers(teacher_dir: Path, prompts_file: Path, max_new_tokens: int) -> str:
    """Greedy teacher answers to the unlabelled prompts, as prompt/completion JSONL lines."""
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    answers = greedy_answers(teacher_dir, prompts, max_new_tokens)
    return "".join(json.dumps({"prompt": p, "completion": a}) + "\n" for p, a in zip(prompts, answers) if a)


def _merge_baseline(run_dir: Path, baseline_dir: Path) -> None:
    """Put the baseline's final scores beside the distilled run's (its report is drawn once every seed ran)."""
    from lmdistill.eval.evaluate import read_metrics, write_metrics

    baseline = read_metrics(baseline_dir).get("student_after")
    if baseline:
        write_metrics(run_dir, {"baseline": baseline})
