"""A CE-only run whose config names a teacher is scored against it; `lmdistill eval RUN_DIR` re-scores the run with
the run's own settings and leaves its metrics.json as the run wrote it."""

import json

import torch
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.config import config_from_dict
from lmdistill.eval import evaluate as evaluate_module
from lmdistill.train import finish
from lmdistill.train.pipeline import run_pipeline


def test_ce_only_run_and_eval_of_the_run_use_its_teacher_and_settings(tiny_pipeline, monkeypatch):
    data = tiny_pipeline([{"name": "ce", "max_steps": 2, "eval_steps": 2, "losses": [{"name": "cross_entropy"}]}])
    data["teacher"]["dtype"] = "bfloat16"
    data["generation"]["max_new_tokens"] = 5
    data["data"]["eval_max_rows"] = 12
    data["data"]["eval"]["domain"].pop("max_rows")
    run_dir = run_pipeline(config_from_dict(data))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "teacher" in metrics and "top1_agreement/domain" in metrics["student_after"]
    assert "kl_teacher_student/domain" in metrics["student_before"]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all("teacher" in s for s in samples)

    seen = {}

    def spy(models, tokenizer, eval_sets, **kwargs):
        seen.update(dtypes={role: next(m.parameters()).dtype for role, m in models.items()},
                    rows={name: len(rows) for name, rows in eval_sets.items()}, max_new_tokens=kwargs["max_new_tokens"])
        return original(models, tokenizer, eval_sets, **kwargs)

    original = evaluate_module.evaluate_models
    monkeypatch.setattr(finish, "evaluate_models", spy)
    before = (run_dir / "metrics.json").read_text()
    result = CliRunner().invoke(app, ["eval", str(run_dir)])
    assert result.exit_code == 0, result.output[-2000:]
    assert seen == {"dtypes": {"student_after": torch.float32, "teacher": torch.bfloat16}, "rows": {"domain": 12},
                    "max_new_tokens": 5}
    assert "eval set domain: 12 rows scored (capped at 12 rows per eval set" in " ".join(result.output.split())
    assert (run_dir / "metrics.json").read_text() == before  # the run's own numbers stay
    written = json.loads((run_dir / "eval_metrics.json").read_text())
    assert set(written) == {"student_after", "teacher"}
