"""The strong-to-weak preset trains float32 master weights under bf16 autocast: an AdamW step at its learning rate
(1e-5) moves the weights, where bfloat16 weights would round most of it away."""

import pytest
import torch
from transformers import TrainerCallback

import lmdistill.train.pipeline as pipeline
from lmdistill.cli import _preset_dict
from lmdistill.config import config_from_dict
from lmdistill.train.pipeline import run_pipeline


class _StepWatch(TrainerCallback):
    """The decoder's weights before and after the first optimizer step, and the dtypes the student trains in."""

    def __init__(self):
        self.before, self.after, self.dtypes = {}, {}, set()

    @staticmethod
    def _layers(model):
        return {n: p.detach().float().clone() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not self.before:
            self.before = self._layers(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.dtypes |= {p.dtype for p in model.parameters()}
        if not self.after:
            self.after = self._layers(model)


def test_strong_to_weak_preset_keeps_float32_master_weights_and_small_updates(s2w_config, monkeypatch):
    preset = _preset_dict("strong-to-weak")
    data = s2w_config()
    data["student"]["dtype"] = preset["student"]["dtype"]
    for key in ("bf16", "learning_rate", "optimizer"):
        if key in preset["training"]:
            data["training"][key] = preset["training"][key]
    lr = data["training"]["learning_rate"]
    assert lr == pytest.approx(1e-5)
    data["stages"] = [{"name": "kd", "max_steps": 1, "losses": [{"name": "forward_kl", "weight": 0.7},
                                                                {"name": "cross_entropy", "weight": 0.3}]}]
    watch = _StepWatch()
    stage_callbacks = pipeline.stage_callbacks
    monkeypatch.setattr(pipeline, "stage_callbacks", lambda *a, **kw: stage_callbacks(*a, **kw) + [watch])
    run_pipeline(config_from_dict(data))

    assert watch.dtypes == {torch.float32}
    assert data["training"]["bf16"]  # computed in bfloat16 all the same
    moved = lost_in_bf16 = total = 0
    for name, w0 in watch.before.items():
        delta = watch.after[name] - w0
        moved += int((delta != 0).sum())
        # The same step applied to bfloat16 weights: rounded back to the old value wherever lr is below half an ulp.
        lost_in_bf16 += int(((w0.bfloat16().float() + delta).bfloat16() == w0.bfloat16()).sum())
        total += w0.numel()
        assert delta.abs().max() <= 1.01 * lr, name  # an AdamW first step moves each weight by at most lr
    assert moved / total > 0.9
    assert lost_in_bf16 / total > 0.5


def test_half_precision_master_weights_are_warned_about(caplog):
    from lmdistill.train.args import check_precision

    config = config_from_dict({"student": {"dtype": "bfloat16"}, "stages": [{"name": "a"}]})
    with caplog.at_level("WARNING", logger="lmdistill.train.args"):
        check_precision(config)
    assert "student.dtype bfloat16: the optimizer updates the weights in bfloat16" in caplog.text
    assert "set student.dtype: float32 and training.bf16: true" in caplog.text


def test_bf16_on_a_gpu_without_bfloat16_names_the_way_out(monkeypatch):
    from lmdistill.errors import ConfigError
    from lmdistill.train.args import check_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: False)
    config = config_from_dict({"training": {"bf16": True}, "stages": [{"name": "a"}]})
    with pytest.raises(ConfigError, match=r"^--bf16 / training.bf16: this GPU has no bfloat16 .* set bf16: false"):
        check_precision(config)
    check_precision(config_from_dict({"training": {"bf16": True, "no_cuda": True}, "stages": [{"name": "a"}]}))
