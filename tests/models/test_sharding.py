"""When the teacher is sharded, and the inputs that cannot be sharded (one process; the two-process run is
tests/distributed/test_sharded_teacher.py)."""

import pytest
import torch

from lmdistill.config import FromTeacher, ModelSettings, Quantization, StudentSettings, config_from_dict
from lmdistill.errors import ConfigError, ModelError
from lmdistill.models.load import load_model, load_student
from lmdistill.models.sharding import is_sharded, local_parameter_count, teacher_shard_size


@pytest.fixture
def clean_launch_env(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("setting, fsdp, deepspeed, world, expected", [
    ("auto", False, False, 4, 1),      # DDP student: the teacher stays whole
    ("auto", True, False, 4, 4),       # FSDP student: the teacher is sharded alike
    ("always", False, False, 4, 4),    # asked for, next to a DDP student
    ("always", True, False, 1, 1),     # one process: nothing to shard over
    ("never", True, False, 4, 1),
    ("always", False, True, 4, 1),     # DeepSpeed: the trainer hands the teacher to a ZeRO-3 engine instead
    ("auto", True, True, 4, 1),
])
def test_shard_size_follows_the_setting_and_the_launch(clean_launch_env, setting, fsdp, deepspeed, world, expected):
    if fsdp:
        clean_launch_env.setenv("ACCELERATE_USE_FSDP", "true")
    if deepspeed:
        clean_launch_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert teacher_shard_size(setting, world) == expected


def test_shard_setting_is_validated_at_load():
    with pytest.raises(ConfigError, match="teacher.shard: Input should be 'auto', 'always' or 'never'"):
        config_from_dict({"teacher": {"name": "t", "shard": "yes"}, "student": {"name": "s"},
                          "data": {"sources": {"d": {"path": "x.jsonl"}}}, "stages": [{"name": "kd"}]})


def test_a_quantized_teacher_cannot_be_sharded(teacher_dir):
    settings = ModelSettings(name=str(teacher_dir), quantization=Quantization(bits=4))
    with pytest.raises(ModelError, match="quantized teacher cannot be sharded.*teacher.shard: never"):
        load_model(settings, "causal", device=torch.device("cpu"), shard_over=2)


def test_a_whole_model_is_not_sharded(teacher_dir):
    model = load_model(ModelSettings(name=str(teacher_dir)), "causal", device=torch.device("cpu"))
    held, total = local_parameter_count(model)
    assert not is_sharded(model) and not is_sharded(None)
    assert held == total == sum(p.numel() for p in model.parameters())


def test_layer_dropping_refuses_a_sharded_teacher(teacher_dir):
    teacher = load_model(ModelSettings(name=str(teacher_dir)), "causal", device=torch.device("cpu"))
    teacher._is_fsdp_managed_module = True  # what transformers marks a model it loaded with FSDP2
    settings = StudentSettings(from_teacher=FromTeacher(num_layers=2))
    with pytest.raises(ModelError, match="teacher is sharded.*teacher.shard: never"):
        load_student(settings, "causal", device=torch.device("cpu"), teacher=teacher)
