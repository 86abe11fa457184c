"""trust_remote_code reaches everything loaded for a model: its tokenizer and config too, not only its weights."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from lmdistill.config import config_from_dict, save_config
from lmdistill.models import load
from lmdistill.train import eval_command, prepare, stage_models


def _recording(monkeypatch, module, calls: list, *names: str) -> None:
    """Replace the loaders `names` that `module` looks up with ones recording (loader, model, trust_remote_code)."""
    for name in names:
        real = getattr(load, name)

        def call(model, trust_remote_code=False, real=real):
            calls.append((real.__name__, model, trust_remote_code))
            return real(model, trust_remote_code=trust_remote_code)

        monkeypatch.setattr(module, name, call)


@pytest.mark.parametrize("student_trusts, teacher_trusts", [(True, False), (False, True)])
def test_tokenizers_and_configs_are_loaded_with_each_models_trust_remote_code(tiny_pipeline, monkeypatch,
                                                                              student_dir, teacher_dir,
                                                                              student_trusts, teacher_trusts):
    calls = []
    _recording(monkeypatch, prepare, calls, "load_tokenizer", "detect_task_type")
    data = tiny_pipeline([{"name": "a", "max_steps": 1}])
    data["teacher"]["trust_remote_code"] = teacher_trusts
    data["student"]["trust_remote_code"] = student_trusts
    prepare.prepare(config_from_dict(data))
    assert sorted(calls) == sorted([("detect_task_type", str(student_dir), student_trusts),
                                    ("load_tokenizer", str(student_dir), student_trusts),
                                    ("load_tokenizer", str(teacher_dir), teacher_trusts)])


@pytest.mark.parametrize("student_trusts, teacher_trusts", [(True, False), (False, True)])
def test_lmdistill_eval_loads_a_runs_tokenizers_with_their_trust_remote_code(tiny_pipeline, monkeypatch, tmp_path,
                                                                             student_dir, teacher_dir,
                                                                             student_trusts, teacher_trusts):
    from lmdistill.config import CONFIG_FILE

    data = tiny_pipeline([{"name": "a", "max_steps": 1}])
    data["teacher"]["trust_remote_code"] = teacher_trusts
    data["student"]["trust_remote_code"] = student_trusts
    run = tmp_path / "run"
    shutil.copytree(student_dir, run / "final")
    save_config(config_from_dict(data), run / CONFIG_FILE)
    calls = []
    _recording(monkeypatch, eval_command, calls, "load_tokenizer", "detect_task_type")
    monkeypatch.setattr(eval_command, "evaluate_roles", lambda *a, **k: {})  # the loading is what is checked
    eval_command.evaluate_target(str(run), out=tmp_path / "metrics.json")
    final = str(run / "final")
    assert sorted(calls) == sorted([("detect_task_type", final, student_trusts),
                                    ("load_tokenizer", final, student_trusts),
                                    ("load_tokenizer", str(teacher_dir), teacher_trusts)])


def test_each_of_several_teachers_loads_its_tokenizer_with_its_trust_remote_code(tiny_pipeline, monkeypatch, tmp_path,
                                                                                 teacher_dir, tokenizer):
    data = tiny_pipeline([{"name": "s", "max_steps": 1}],
                         teachers=[{"name": str(teacher_dir)}, {"name": str(teacher_dir), "trust_remote_code": True}])
    del data["teacher"]
    config = config_from_dict(data)
    calls = []
    _recording(monkeypatch, stage_models, calls, "load_tokenizer")
    first = load.load_model(config.teacher, "causal", device=torch.device("cpu"))
    prep = SimpleNamespace(task_type="causal", tokenizer=tokenizer, teacher=first, pool=stage_models.TeacherPool(),
                           student=config.student, teacher_processes=1)
    stage_models.stage_teacher(config, prep, config.stages[0], tmp_path)
    assert calls == [("load_tokenizer", str(teacher_dir), True)]
