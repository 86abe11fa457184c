"""The settings the embedded demo runs with, calibrated by bench/demo_calibration.py on 2 CPU cores.

Data only: `lmdistill demo` reads these to build its pipeline, and the bench reads them as its defaults,
so the numbers measured there are the numbers the demo runs. The story they make true: the teacher
learns every company's facts (it has all the labels); the student has labels for a fifth of the
companies, and the distilled one also learns from the teacher's answers to the other companies' prompts
(greedy, chat template, cut at <|im_end|>, `max_new_tokens`).

Measured (bench/demo_calibration.py, 1 torch thread on a shared 2-core box; EM on held-out phrasings,
domain ppl over answer tokens):
  full  (100 companies)  teacher 4x192 EM 0.70 ppl 1.24 gen 2.95 | baseline 2x96 EM 0.18 ppl 55.5 gen 3727
                         distilled 2x96 EM 0.67 ppl 1.39 gen 1072 | 566 s CPU in all
  quick (60 companies)   teacher 4x128 EM 0.73 ppl 1.22 gen 2.90 | baseline 2x64 EM 0.21 ppl 65.9 gen 92.8
                         distilled 2x64 EM 0.38 ppl 1.48 gen 37.2 | 162 s CPU in all
Both students lose general text in the domain-only stage 3 (gen ppl above); the distilled one less.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSize:
    """A tiny Llama (lmdistill.models.tiny.tiny_causal_lm): layers x hidden width, 4 heads, MLP 4x wide."""

    layers: int
    hidden: int


@dataclass(frozen=True)
class StageRecipe:
    """One distillation stage. `domain_share` goes linearly from the first to the second value over the
    stage (the rest of each batch is general text); `alpha` weighs CE in alpha*CE + (1-alpha)*T^2*KL."""

    name: str
    steps: int
    domain_share: tuple[float, float]
    alpha: float
    temperature: float


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the demo trains with. Shares of the teacher's data are over named demo files."""

    vocab_size: int
    batch_size: int
    warmup_ratio: float
    teacher: ModelSize
    teacher_steps: int
    teacher_lr: float
    teacher_mix: dict[str, float]
    student: ModelSize
    student_lr: float
    stages: tuple[StageRecipe, ...]
    max_new_tokens: int


def _stages(steps: tuple[int, int, int]) -> tuple[StageRecipe, ...]:
    # The baseline runs the same stages with alpha = 1 (CE only) and no teacher-answered prompts.
    return (StageRecipe("general", steps[0], (0.0, 0.0), alpha=0.5, temperature=2.0),
            StageRecipe("mix", steps[1], (0.3, 0.7), alpha=0.5, temperature=2.0),
            StageRecipe("domain", steps[2], (1.0, 1.0), alpha=0.5, temperature=2.0))


_TEACHER_MIX = {"general_train": 0.25, "domain_docs": 0.10, "domain_qa_teacher": 0.65}

FULL_RECIPE = DemoRecipe(vocab_size=1024, batch_size=32, warmup_ratio=0.1,
                         teacher=ModelSize(4, 192), teacher_steps=1000, teacher_lr=2e-3, teacher_mix=_TEACHER_MIX,
                         student=ModelSize(2, 96), student_lr=3e-3, stages=_stages((150, 300, 350)),
                         max_new_tokens=10)
QUICK_RECIPE = DemoRecipe(vocab_size=1024, batch_size=32, warmup_ratio=0.1,
                          teacher=ModelSize(4, 128), teacher_steps=450, teacher_lr=3e-3, teacher_mix=_TEACHER_MIX,
                          student=ModelSize(2, 64), student_lr=3e-3, stages=_stages((100, 150, 200)),
                          max_new_tokens=10)


def demo_recipe(quick: bool) -> DemoRecipe:
    return QUICK_RECIPE if quick else FULL_RECIPE
