"""seeds.json (a run repeated over training seeds): mean and sample standard deviation against a plain reference on
random scores, metrics some seed lacks left out, and what the report says of one seed or an unreadable file."""

from __future__ import annotations

import math
import random

import pytest

from lmdistill.eval.evaluate import write_metrics
from lmdistill.eval.report import write_report
from lmdistill.eval.seeds import SEEDS_FILE, SeedRuns, read_seed_runs, write_seed_runs


def test_mean_and_std_match_a_plain_reference(tmp_path):
    rng = random.Random(0)
    seeds = [3, 4, 5, 6]
    metrics = [{"student_after": {"exact_match": rng.random(), "perplexity/domain": rng.uniform(1, 30)},
                "baseline": {"exact_match": rng.random()}} for _ in seeds]
    metrics[2]["student_after"].pop("perplexity/domain")  # one seed lacks it: no mean over the others
    write_seed_runs(tmp_path, SeedRuns(seeds, metrics))
    means, stds = read_seed_runs(tmp_path).mean_std()
    for role in ("student_after", "baseline"):
        values = [m[role]["exact_match"] for m in metrics]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        assert means[role]["exact_match"] == pytest.approx(mean, rel=1e-12)
        assert stds[role]["exact_match"] == pytest.approx(std, rel=1e-12)
    assert set(means["student_after"]) == set(stds["student_after"]) == {"exact_match"}
    one = SeedRuns([3], metrics[:1]).mean_std()
    assert one == (metrics[0], {role: {k: 0.0 for k in m} for role, m in metrics[0].items()})


def test_report_of_one_seed_says_there_is_no_spread(tmp_path):
    scores = {"student_after": {"exact_match": 0.5}, "baseline": {"exact_match": 0.25}}
    write_metrics(tmp_path, scores)
    write_seed_runs(tmp_path, SeedRuns([42], [scores]))
    page = write_report(tmp_path).read_text()
    assert "One training seed (42), so no spread" in page and "lmdistill demo --seeds K" in page
    assert "±" not in page.replace("mean ± std over K", "")
    assert "Against the CE-only baseline, student_after is better on 1 of 1" in page


def test_unreadable_seeds_file_is_named_in_the_report(tmp_path):
    write_metrics(tmp_path, {"student_after": {"exact_match": 0.5}})
    (tmp_path / SEEDS_FILE).write_text('{"seeds": [1, 2], "metrics": [{}]}')
    page = write_report(tmp_path).read_text()
    assert f"{tmp_path / SEEDS_FILE} could not be read (ValueError: 2 seeds for 1 runs" in page
    assert "delete it, or run the seeds again" in page
