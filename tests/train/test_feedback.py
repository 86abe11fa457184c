"""Evaluation-driven sampling: a planted weak source gains sampling weight after an evaluation."""

from types import SimpleNamespace

import lmdistill.train.feedback as feedback
from lmdistill.config import EvalDrivenSettings
from lmdistill.data.mixture import MixtureDataset


def _rows(n, source):
    return [{"input_ids": [5, 6, 7], "labels": [5, 6, 7], "source": source, "row_id": i} for i in range(n)]


def test_weak_source_weight_rises(monkeypatch, tmp_path):
    sources = {"easy": _rows(20, "easy"), "weak": _rows(20, "weak"), "other": _rows(20, "other")}
    dataset = MixtureDataset(sources, {"easy": 1.0, "weak": 1.0, "other": 1.0}, None, num_draws=3000, seed=0)
    gaps = {"easy": 0.1, "weak": 0.9, "other": 0.1}
    monkeypatch.setattr(feedback, "agreement_and_kl",
                        lambda teacher, model, examples, batch_size: {"mean_kl": gaps[examples[0]["source"]]})
    callback = feedback.EvalDrivenSampling(dataset, teacher=object(), eval_sets=sources, settings=EvalDrivenSettings(),
                                           stage_dir=tmp_path)
    before = dataset.probabilities(0.5)["weak"]
    state = SimpleNamespace(global_step=10, is_world_process_zero=True)
    callback.on_evaluate(None, state, None, model=object())
    after = dataset.probabilities(0.5)["weak"]
    assert after > before + 0.1
    drawn = sum(dataset[i]["source"] == "weak" for i in range(3000)) / 3000
    assert abs(drawn - after) < 0.02
    assert min(dataset.probabilities(0.5).values()) > 0  # nothing vanishes
    assert (tmp_path / feedback.STATE_FILE).exists()
    # a resumed stage starts from the saved weights
    fresh = MixtureDataset(sources, {"easy": 1.0, "weak": 1.0, "other": 1.0}, None, num_draws=3000, seed=0)
    feedback.EvalDrivenSampling(fresh, teacher=object(), eval_sets=sources, settings=EvalDrivenSettings(), stage_dir=tmp_path)
    assert abs(fresh.probabilities(0.5)["weak"] - after) < 1e-9
