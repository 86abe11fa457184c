"""teacher_zero3_config (pure: runs without deepspeed) and deepspeed_teacher's paths that need no DeepSpeed engine.
The engine itself is checked on 2 CPU processes in test_deepspeed_cpu.py, where deepspeed is installed."""

import copy
import sys
from types import SimpleNamespace

import pytest
from accelerate.utils import DeepSpeedPlugin
from torch import nn
from transformers import AutoModelForCausalLM

from lmdistill.errors import TrainingError
from lmdistill.teacher.ensemble import TeacherEnsemble
from lmdistill.train.deepspeed_teacher import deepspeed_teacher, deepspeed_teachers, teacher_zero3_config


def _student_config(stage: int = 3) -> dict:
    """A resolved ZeRO config as Trainer leaves it, with every training-only section a student would have."""
    return {
        "train_batch_size": 32,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.0}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": stage,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 4096,
            "sub_group_size": 1e9,
            "stage3_prefetch_bucket_size": 3686,
            "stage3_param_persistence_threshold": 640,
            "stage3_max_live_parameters": 1e9,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def _autos(config) -> list:
    if isinstance(config, dict):
        return [v for value in config.values() for v in _autos(value)]
    return [config] if config == "auto" else []


def _accelerator(ds_config: dict | None):
    plugin = None if ds_config is None else SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


def test_stage3_keeps_parameter_knobs_and_drops_training_sections():
    student = _student_config()
    before = copy.deepcopy(student)
    config = teacher_zero3_config(student)

    assert student == before  # the student's config is not touched
    zero = config["zero_optimization"]
    assert zero == {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                    "stage3_prefetch_bucket_size": 3686, "stage3_param_persistence_threshold": 640,
                    "stage3_max_live_parameters": 1e9}
    for gone in ("optimizer", "scheduler", "gradient_clipping", "train_batch_size"):
        assert gone not in config
    assert config["bf16"] == {"enabled": True}
    # Batch keys stay consistent without the world size: DeepSpeed derives train_batch_size = micro * ga * W.
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
    # The result is a copy: changing it leaves the student's nested sections alone.
    zero["offload_param"]["device"] = "nvme"
    assert student["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_accelerate_plugin_config_with_autos_resolves_or_drops_every_auto():
    # What accelerate builds from examples/accelerate/deepspeed_zero3.yaml before Trainer fills anything in.
    plugin = DeepSpeedPlugin(zero_stage=3, offload_param_device="cpu", zero3_init_flag=False)
    student = plugin.deepspeed_config
    assert _autos(student)  # the premise: batch keys and clipping are "auto"
    student["zero_optimization"].update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto",
                                        reduce_bucket_size="auto")

    hidden = 96
    config = teacher_zero3_config(student, hidden_size=hidden)
    assert _autos(config) == []
    assert config["train_micro_batch_size_per_gpu"] == 1 and config["gradient_accumulation_steps"] == 1
    zero = config["zero_optimization"]
    # transformers' sizing rule, applied to the teacher's width.
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden
    assert "reduce_bucket_size" not in zero and "offload_optimizer" not in zero
    assert zero["offload_param"] == {"device": "cpu", "nvme_path": None}

    # Without the teacher's width the "auto" knobs are left to DeepSpeed's defaults.
    zero = teacher_zero3_config(student)["zero_optimization"]
    assert "stage3_prefetch_bucket_size" not in zero and "stage3_param_persistence_threshold" not in zero


def test_unresolved_precision_is_an_error_not_a_silent_float32():
    student = _student_config()
    student["fp16"] = {"enabled": "auto", "loss_scale": 0}
    with pytest.raises(TrainingError, match=r"fp16\.enabled is still 'auto'.*set fp16\.enabled to true or false"):
        teacher_zero3_config(student)
    student["fp16"]["enabled"] = False
    assert teacher_zero3_config(student)["fp16"] == {"enabled": False, "loss_scale": 0}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_below_stage3_the_teacher_is_not_handed_to_deepspeed(stage):
    assert teacher_zero3_config(_student_config(stage)) is None

    teacher = nn.Linear(4, 4)
    result = deepspeed_teacher(teacher, _accelerator(_student_config(stage)))
    assert result is teacher and not result.training
    assert not any(p.requires_grad for p in result.parameters())


@pytest.mark.parametrize("student, message", [
    ({"train_micro_batch_size_per_gpu": 1}, "has no zero_optimization.stage"),
    ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "has no zero_optimization.stage"),
    ({"zero_optimization": {"stage": 4}}, "must be 0, 1, 2 or 3, got 4"),
    ({"zero_optimization": {"stage": "3"}}, "must be 0, 1, 2 or 3, got '3'"),
    ("zero3.json", "must be a dict"),
])
def test_bad_student_config_says_what_to_fix(student, message):
    with pytest.raises(TrainingError, match=message):
        teacher_zero3_config(student)


def test_an_accelerator_without_deepspeed_is_refused():
    with pytest.raises(TrainingError, match="has no DeepSpeed plugin"):
        deepspeed_teacher(nn.Linear(4, 4), _accelerator(None))


def test_missing_deepspeed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` raise ImportError
    with pytest.raises(TrainingError, match="deepspeed is not installed: pip install deepspeed"):
        deepspeed_teacher(nn.Linear(4, 4), _accelerator(_student_config(3)))


def test_each_of_several_teachers_is_partitioned_by_its_own_shard_setting(teacher_dir, student_dir, monkeypatch):
    """Under ZeRO-3 the trainer hands each teacher to an engine of its own unless its entry says shard: never."""
    engines = []
    fake = SimpleNamespace(initialize=lambda model, config: (engines.append(model) or SimpleNamespace(module=model),))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    accelerator = _accelerator(_student_config(3))
    models = [AutoModelForCausalLM.from_pretrained(d) for d in (teacher_dir, student_dir)]
    ensemble = TeacherEnsemble(models, [1.0, 1.0], {}, temperature=1.0)
    assert deepspeed_teachers(ensemble, ["never", "auto"], accelerator) is ensemble
    assert len(engines) == 1 and engines[0] is models[1]
    engines.clear()
    assert deepspeed_teachers(ensemble, ["always", "never"], accelerator) is ensemble
    assert len(engines) == 1 and engines[0] is models[0]
    engines.clear()
    assert deepspeed_teachers(models[0], ["never"], accelerator) is models[0] and not engines  # one teacher, as before
