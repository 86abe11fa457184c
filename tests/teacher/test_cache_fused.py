"""A teacher_source: cache stage with fused: true trains through run_pipeline like the same stage with fused: false:
same logged losses (train and eval), without loading the teacher."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.config import config_from_dict
from lmdistill.losses import DistillObjective
from lmdistill.train import prepare
from lmdistill.train.pipeline import run_pipeline

# T = 1 over the fixture cache's T = 2 capture (k = 64, fp16, stored tail); accumulation over 2 micro-batches.
STAGE = {"name": "s", "max_steps": 3, "gradient_accumulation_steps": 2, "temperature": 1.0, "eval_steps": 2,
         "teacher_source": "cache", "chunk_size": 5,
         "losses": [{"name": "forward_kl", "weight": 0.7}, {"name": "cross_entropy", "weight": 0.3}]}


def _history(run_dir) -> tuple[list[float], list[float]]:
    history = json.loads((run_dir / "s" / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h]


def _padded_student(student_dir, out_dir) -> str:
    """The fixture student with 8 padding rows past the tokenizer's ids in its embeddings and output layer."""
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    model.resize_token_embeddings(model.get_output_embeddings().weight.shape[0] + 8)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(out_dir)
    return str(out_dir)


@pytest.mark.parametrize("padded", [False, True])
def test_fused_cached_stage_trains_like_the_unfused_one(teacher_config, tmp_path, topk_cache, monkeypatch,
                                                        vocab_size, fixture_paths, padded):
    def no_teacher(*args, **kwargs):
        raise AssertionError("a cached stage loaded the teacher")

    head_rows = []
    fused_cached = DistillObjective.fused_cached

    def spy(self, hidden, weight, *args, **kwargs):
        head_rows.append(weight.shape[0])
        return fused_cached(self, hidden, weight, *args, **kwargs)

    monkeypatch.setattr(prepare, "frozen_teacher", no_teacher)
    monkeypatch.setattr(DistillObjective, "fused_cached", spy)
    student = _padded_student(fixture_paths["student"], tmp_path / "student") if padded else fixture_paths["student"]
    runs = {}
    for fused in (False, True):
        config = config_from_dict(teacher_config([{**STAGE, "fused": fused}], output_dir=str(tmp_path / str(fused)),
                                                 student={"name": str(student)},
                                                 teacher_cache={"path": str(topk_cache)}))
        runs[fused] = _history(run_pipeline(config))
    (losses, evals), (ref_losses, ref_evals) = runs[True], runs[False]
    assert len(losses) == 3 and len(evals) >= 2
    # Every fused step and eval went through the cache, on the head cut to the cache's vocabulary.
    assert len(head_rows) >= 3 * 2 and set(head_rows) == {vocab_size}
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert evals == pytest.approx(ref_evals, rel=1e-5)
