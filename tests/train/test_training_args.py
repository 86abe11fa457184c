"""Trainer settings users of Trainer-based tools expect: gradient checkpointing, torch.compile, loader workers, a
DeepSpeed JSON, any other TrainingArguments field (names checked at load), early stopping on the eval metric."""

import importlib.util
import json
import warnings

import pytest

import lmdistill.train.pipeline as pipeline
from lmdistill.config import config_from_dict
from lmdistill.errors import ConfigError
from lmdistill.train import args as args_module
from lmdistill.train.args import stage_training_arguments
from lmdistill.train.pipeline import run_pipeline


def _config(training: dict, **stage):
    return config_from_dict({"stages": [{"name": "s", "max_steps": 4, **stage}], "training": training},
                            source="c.yaml")


def test_trainer_settings_reach_training_arguments(tmp_path):
    config = _config({"gradient_checkpointing": True, "torch_compile": True, "dataloader_num_workers": 2,
                      "patience": 3, "extra_args": {"dataloader_pin_memory": False, "adam_beta2": 0.95}},
                     eval_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated TrainingArguments name on every stage
        args = stage_training_arguments(config, config.stages[0], tmp_path, has_eval=True)
    assert args.gradient_checkpointing and args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert args.torch_compile and args.dataloader_num_workers == 2
    assert args.dataloader_pin_memory is False and args.adam_beta2 == 0.95
    assert args.restore_callback_states_from_checkpoint  # the early-stopping counter survives a resume


def test_deepspeed_json_reaches_training_arguments(tmp_path, monkeypatch):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    config = _config({"deepspeed": str(ds)})
    stage = config.stages[0]
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match=r"^training.deepspeed needs the deepspeed package: pip install deepspeed"):
            stage_training_arguments(config, stage, tmp_path, has_eval=False)
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else
                            real(name, *a))
    monkeypatch.setattr(args_module, "TrainingArguments", lambda **kwargs: kwargs)  # what Trainer would be given
    assert stage_training_arguments(config, stage, tmp_path, has_eval=False)["deepspeed"] == str(ds)
    missing = _config({"deepspeed": str(tmp_path / "nope.json")})
    with pytest.raises(ConfigError, match=r"^training.deepspeed: no file at .*nope.json; give the path of a DeepSpeed"):
        stage_training_arguments(missing, missing.stages[0], tmp_path, has_eval=False)


@pytest.mark.parametrize("training, stage, has_eval, message", [
    ({"extra_args": {"learning_rate": 1e-3}}, {}, False,
     r"^training.extra_args.learning_rate: lmdistill sets this TrainingArguments field from its own keys"),
    ({"patience": 2}, {}, True, r"^stages\[s\]: training.patience .* evaluated only once, at its end; set eval_steps"),
    ({"patience": 2}, {}, False, r"evaluated never \(no data.eval\); set eval_steps on the stage and give data.eval"),
    ({"dataloader_num_workers": 2}, {"eval_driven_sampling": {}}, True,
     r"evaluation-driven sampling .* set training.dataloader_num_workers: 0"),
])
def test_trainer_settings_that_cannot_work_are_named(tmp_path, training, stage, has_eval, message):
    config = _config(training, **stage)
    with pytest.raises(ConfigError, match=message):
        stage_training_arguments(config, config.stages[0], tmp_path, has_eval=has_eval)


def test_patience_works_with_the_evaluation_at_each_epoch(tmp_path):
    config = _config({"patience": 2})
    args = stage_training_arguments(config, config.stages[0], tmp_path, has_eval=True, epochs=3.0)
    assert args.eval_strategy == "epoch" and args.restore_callback_states_from_checkpoint


def test_a_typo_in_extra_args_fails_at_load_naming_the_key():
    with pytest.raises(ConfigError) as err:
        _config({"extra_args": {"dataloader_pin_memroy": False}})
    assert str(err.value) == ("c.yaml: training.extra_args: 'dataloader_pin_memroy' is not a TrainingArguments "
                              "field; did you mean 'dataloader_pin_memory'?")


def test_early_stopping_ends_a_stage_whose_metric_stops_improving(tiny_pipeline, monkeypatch):
    """At a learning rate too small to move a float32 weight, eval_loss never improves after the first evaluation:
    with patience 2 the stage stops at its third evaluation instead of running 40 steps. Gradient checkpointing is on
    in the trained model."""
    from transformers import TrainerCallback

    checkpointing = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            checkpointing.append(model.is_gradient_checkpointing and model.training)

    monkeypatch.setattr(pipeline, "early_stopping", lambda config: args_module.early_stopping(config) + [Spy()])
    data = tiny_pipeline([{"name": "a", "max_steps": 40, "eval_steps": 1, "learning_rate": 1e-12,
                           "losses": [{"name": "forward_kl"}]}],
                         evaluation={"enabled": False, "report": False, "num_samples": 0})
    data["training"].update(patience=2, gradient_checkpointing=True, save_total_limit=1)
    data["data"]["eval"]["domain"]["max_rows"] = 4
    run_dir = run_pipeline(config_from_dict(data))
    history = json.loads((run_dir / "a" / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h] == [1, 2, 3]
    assert max(h["step"] for h in history) == 3 and (run_dir / "a" / "best").exists()
    assert checkpointing and all(checkpointing)
