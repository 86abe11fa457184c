"""The demo recipe is well formed: the 3-stage shape the pipeline expects, a ~5x smaller student, a
teacher mixture over files the corpus writes, and a quick variant that is smaller everywhere."""

from __future__ import annotations

import pytest

from lmdistill.demo.corpus import build_demo_rows
from lmdistill.demo.recipe import demo_recipe


def n_params(vocab: int, layers: int, hidden: int) -> int:
    """Parameters of lmdistill.models.tiny.tiny_causal_lm, counted by hand so that this file needs no torch:
    untied embedding and lm_head (V x H each); per layer q, k, v, o (H x H), gate, up, down (H x 4H) and two
    RMSNorm weights; a final norm. (4x192 at V=1024 gives 2,754,240, as bench/demo_calibration.py prints.)"""
    return 2 * vocab * hidden + layers * (16 * hidden * hidden + 2 * hidden) + hidden


@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_recipe_shape(quick):
    recipe = demo_recipe(quick)
    assert [s.domain_share for s in recipe.stages] == [(0.0, 0.0), (0.3, 0.7), (1.0, 1.0)]
    assert all(0.0 <= s.alpha < 1.0 and s.temperature >= 1.0 and s.steps > 0 for s in recipe.stages)
    assert set(recipe.teacher_mix) <= set(build_demo_rows(quick)) and sum(recipe.teacher_mix.values()) == pytest.approx(1)
    ratio = (n_params(recipe.vocab_size, recipe.teacher.layers, recipe.teacher.hidden)
             / n_params(recipe.vocab_size, recipe.student.layers, recipe.student.hidden))
    assert 4.5 <= ratio <= 7.0, ratio


def test_quick_is_smaller_everywhere():
    quick, full = demo_recipe(True), demo_recipe(False)
    assert quick.teacher_steps < full.teacher_steps
    assert all(q.steps <= f.steps for q, f in zip(quick.stages, full.stages, strict=True))
    assert quick.teacher.hidden <= full.teacher.hidden and quick.student.hidden <= full.student.hidden
