"""report.html from a synthetic run directory: its plots, tables, headline, escaping, and a headless Chromium
screenshot of the page."""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lmdistill.errors import LmdistillError
from lmdistill.eval.evaluate import write_metrics
from lmdistill.eval.report import write_report
from lmdistill.eval.samples import write_samples

STAGES = ["stage1", "stage2", "stage3"]
ROLES = {
    "teacher": {"params": 5_000_000, "disk_mb": 20.0, "tokens_per_s/batch1": 100.0, "tokens_per_s/batch8": 500.0,
                "perplexity/domain": 8.0, "rouge_l": 0.5, "exact_match": 0.6},
    "student_before": {"params": 1_000_000, "disk_mb": 4.0, "tokens_per_s/batch1": 400.0,
                       "tokens_per_s/batch8": 2400.0, "perplexity/domain": 60.0, "rouge_l": 0.1, "exact_match": 0.0,
                       "top1_agreement/domain": 0.2, "kl_teacher_student/domain": 2.5},
    "student_after": {"params": 1_000_000, "disk_mb": 4.0, "tokens_per_s/batch1": 400.0,
                      "tokens_per_s/batch8": 2400.0, "perplexity/domain": 12.0, "rouge_l": 0.45, "exact_match": 0.5,
                      "top1_agreement/domain": 0.7, "kl_teacher_student/domain": 0.4},
    "baseline": {"params": 1_000_000, "disk_mb": 4.0, "tokens_per_s/batch1": 400.0, "tokens_per_s/batch8": 2400.0,
                 "perplexity/domain": 15.0, "rouge_l": 0.47, "exact_match": 0.3},
}


def _log_history(stage_index: int) -> list[dict]:
    history = []
    for step in range(1, 31):
        kl, ce = 2.0 / (step + stage_index), 3.0 / math.sqrt(step)
        history.append({"step": step, "epoch": step / 30, "loss": 0.7 * kl + 0.3 * ce, "loss/forward_kl": kl,
                        "loss/cross_entropy": ce, "weight/forward_kl": 0.7, "learning_rate": 1e-3, "grad_norm": 1.0})
        if step % 10 == 0:
            history.append({"step": step, "epoch": step / 30, "eval_loss": 3.0 - stage_index - step / 30,
                            "eval_runtime": 0.2, "eval_samples_per_second": 50.0})
    history.append({"step": 30, "train_loss": 1.0, "train_runtime": 12.0})
    return history


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    state = {"stages": [{"name": s, "status": "done", "best_path": str(run / s / "best"),
                         "final_path": str(run / s / "final"), "best_metric": 2.0 - i / 2, "metric_name": "eval_loss"}
                        for i, s in enumerate(STAGES)], "final_path": str(run / "final")}
    (run / "pipeline_state.json").write_text(json.dumps(state))
    (run / "lmdistill_config.yaml").write_text("seed: 0\nteacher: {model: tiny-teacher}\n")
    for i, stage in enumerate(STAGES):
        (run / stage).mkdir()
        (run / stage / "log_history.json").write_text(json.dumps(_log_history(i)))
    write_metrics(run, ROLES)
    write_samples(run, [{"prompt": "What is <script>alert(1)</script>?", "teacher": "t1", "student": "s1"}],
                  stage="stage1", step=10)
    write_samples(run, [{"prompt": f"Question {i}?", "teacher": f"Teacher answer {i}", "student": f"Student {i}"}
                        for i in range(3)], stage="final", step=90)
    return run


def test_report_has_plots_tables_headline_and_no_external_resources(run_dir):
    page = write_report(run_dir).read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert {alt for alt, _ in images} == {"quality metrics per model", "size and speed", "training loss curves",
                                          "eval metrics per stage"}
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for _, data in images)
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing fetched
    header = re.search(r'<table class="metrics"><thead><tr>(.*?)</tr>', page).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["metric", "teacher", "student_before", "student_after",
                                                      "baseline", "after vs baseline"]
    # Direction-aware comparison with the baseline: 12 < 15 perplexity wins, 0.45 < 0.47 ROUGE-L loses.
    assert re.search(r"perplexity/domain<small> \(lower is better\)</small></td>(<td>.*?</td>){4}"
                     r'<td class="better">better</td>', page)
    assert re.search(r'rouge_l<small> greedy answers to the eval prompts vs the reference answers</small></td>'
                     r'(<td>.*?</td>){4}<td class="worse">worse</td>', page)
    # the KL's direction is spelled out where it is shown
    assert "kl_teacher_student/domain<small> KL(teacher || student), nats per token (lower is better)</small>" in page
    assert ("student_after is 5.0x smaller (parameters), 4.0x faster (generation, batch 1), keeps 90% of the "
            "teacher&#x27;s ROUGE-L.") in page
    assert ("Against the CE-only baseline, student_after is better on 2 of 3 quality metrics (exact_match, "
            "perplexity/domain) and worse on rouge_l.") in page
    for stage in STAGES:
        assert f"<td>{stage}</td><td>done</td>" in page
    assert "stage final, step 90" in page and "Teacher answer 2" in page and "<td>Question 0?</td>" in page
    assert "alert(1)" not in page.split("stage final, step 90")[1]  # only the latest evaluation's samples
    assert "<script>" not in page
    assert "no CE-only baseline" not in page


def test_report_of_a_bare_run_says_what_is_missing(tmp_path):
    (tmp_path / "lmdistill_config.yaml").write_text("seed: 0\n")
    page = write_report(tmp_path).read_text()
    assert "<img" not in page
    for text in ("no metrics.json", "no CE-only baseline was evaluated", "no samples.jsonl", "no pipeline_state.json",
                 "No training loss was logged.", "seed: 0"):
        assert text in page
    with pytest.raises(LmdistillError, match="no run directory at .*: pass the output_dir of `lmdistill run`"):
        write_report(tmp_path / "nowhere")


def test_report_survives_a_corrupt_log_history(run_dir):
    (run_dir / "stage2" / "log_history.json").write_text("[{broken")
    page = write_report(run_dir).read_text()
    assert "log_history.json in" in page and "could not be read (JSONDecodeError)" in page
    assert 'alt="training loss curves"' in page


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (CI installs the Debian `chromium` package "
                                                "in .ci/run; `apt-get install -y chromium` to run this test)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    from matplotlib.image import imread

    report = write_report(run_dir)
    shot = tmp_path / "report.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chrome-profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
           report.resolve().as_uri()]
    subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    assert shot.exists(), "chromium wrote no screenshot"
    assert shot.stat().st_size > 20_000
    pixels = imread(shot)[..., :3]  # [H, W, 3] floats in [0, 1]
    assert pixels.shape[:2] == (2000, 1200)
    # A rendered page with plots has plenty of non-white pixels and colour; a blank or error page does not.
    assert (pixels.min(axis=-1) < 0.9).mean() > 0.03
    assert (pixels.max(axis=-1) - pixels.min(axis=-1)).max() > 0.3


def test_timing_noise_between_same_size_models_is_equal():
    from lmdistill.eval.report import metrics_table

    metrics = {"student_after": {"tokens_per_s/batch1": 930.0, "tokens_per_s/batch8": 3000.0},
               "baseline": {"tokens_per_s/batch1": 981.0, "tokens_per_s/batch8": 5000.0}}
    html = metrics_table(metrics, ["tokens_per_s/batch1", "tokens_per_s/batch8"])
    rows = html.split("<tr")
    assert "equal" in next(r for r in rows if "batch1" in r)
    assert "worse" in next(r for r in rows if "batch8" in r)
