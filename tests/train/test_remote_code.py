"""trust_remote_code reaches everything loaded for a model: its tokenizer and config too, not only its weights."""

import pytest

from lmdistill.config import config_from_dict
from lmdistill.models import load
from lmdistill.train import prepare


@pytest.mark.parametrize("student_trusts, teacher_trusts", [(True, False), (False, True)])
def test_tokenizers_and_configs_are_loaded_with_each_models_trust_remote_code(tiny_pipeline, monkeypatch,
                                                                              student_dir, teacher_dir,
                                                                              student_trusts, teacher_trusts):
    calls = []

    def recorded(real):
        def call(name, trust_remote_code=False):
            calls.append((real.__name__, name, trust_remote_code))
            return real(name, trust_remote_code=trust_remote_code)
        return call

    monkeypatch.setattr(prepare, "load_tokenizer", recorded(load.load_tokenizer))
    monkeypatch.setattr(prepare, "detect_task_type", recorded(load.detect_task_type))
    data = tiny_pipeline([{"name": "a", "max_steps": 1}])
    data["teacher"]["trust_remote_code"] = teacher_trusts
    data["student"]["trust_remote_code"] = student_trusts
    prepare.prepare(config_from_dict(data))
    assert sorted(calls) == sorted([("detect_task_type", str(student_dir), student_trusts),
                                    ("load_tokenizer", str(student_dir), student_trusts),
                                    ("load_tokenizer", str(teacher_dir), teacher_trusts)])
