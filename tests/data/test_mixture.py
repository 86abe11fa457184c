"""B3/B4: ratio schedules, sampled proportions, reproducible items, evaluation-driven reweighting."""

from __future__ import annotations

import math

import pytest

from lmdistill.data.mixture import MixtureDataset, RatioSchedule, reweight_by_gap, split_example_id
from lmdistill.errors import ConfigError, DataError


def make_sources(buckets=("rates", "tax", "bonds")):
    general = [{"input_ids": [i], "row_id": i} for i in range(50)]
    domain = [{"input_ids": [100 + i], "row_id": 1000 + i, "bucket": buckets[i % len(buckets)]} for i in range(60)]
    return {"general": general, "domain": domain}


def test_schedule_shares():
    lin = RatioSchedule("linear", "domain", 0.3, 0.7)
    cos = RatioSchedule("cosine", "domain", 0.3, 0.7)
    assert [lin.share(p) for p in (0, 0.5, 1, 2)] == pytest.approx([0.3, 0.5, 0.7, 0.7])
    assert [cos.share(p) for p in (0, 0.5, 1)] == pytest.approx([0.3, 0.5, 0.7])
    assert cos.share(0.1) < lin.share(0.1) and cos.share(0.9) > lin.share(0.9)  # slow start, slow finish
    assert RatioSchedule("constant", "domain", 0.4).share(0.8) == 0.4


@pytest.mark.parametrize("kind, start, end", [("constant", 0.3, None), ("linear", 0.3, 0.7), ("cosine", 0.3, 0.7),
                                              ("linear", 0.9, 0.1)])
def test_sampled_proportions_follow_the_schedule(kind, start, end):
    schedule = RatioSchedule(kind, "domain", start, end)
    n = 10_000
    ds = MixtureDataset(make_sources(), {"general": 1.0, "domain": 1.0}, schedule, num_draws=n, seed=3)
    is_domain = [ds[i]["input_ids"][0] >= 100 for i in range(n)]
    expected = [schedule.share(i / n) for i in range(n)]
    assert abs(sum(is_domain) / n - sum(expected) / n) < 0.02
    for w in range(0, n, 1000):  # every window of 1,000 draws, too
        assert abs(sum(is_domain[w:w + 1000]) / 1000 - sum(expected[w:w + 1000]) / 1000) < 0.02


def test_unscheduled_sources_split_the_rest_by_weight():
    sources = make_sources() | {"code": [{"input_ids": [999], "row_id": 0}]}
    ds = MixtureDataset(sources, {"general": 3, "domain": 1, "code": 1}, RatioSchedule("constant", "domain", 0.4),
                        num_draws=10_000, seed=0)
    names = [ds.names[split_example_id(ds[i]["example_id"])[0]] for i in range(10_000)]
    for name, share in {"general": 0.45, "domain": 0.4, "code": 0.15}.items():
        assert abs(names.count(name) / 10_000 - share) < 0.02


def test_items_are_pure_functions_of_seed_and_index_and_carry_ids():
    a = MixtureDataset(make_sources(), {"general": 1, "domain": 1}, None, num_draws=500, seed=7)
    b = MixtureDataset(make_sources(), {"general": 1, "domain": 1}, None, num_draws=500, seed=7)
    forward = [a[i] for i in range(500)]
    assert [b[i] for i in reversed(range(500))][::-1] == forward
    c = MixtureDataset(make_sources(), {"general": 1, "domain": 1}, None, num_draws=500, seed=8)
    assert [c[i] for i in range(500)] != forward
    sources = make_sources()
    for item in forward[:50]:
        source_index, row_id = split_example_id(item["example_id"])
        original = next(e for e in sources[a.names[source_index]] if e["row_id"] == row_id)
        assert {k: v for k, v in item.items() if k != "example_id"} == original
    with pytest.raises(IndexError):
        a[500]


def test_resume_reproduces_items_after_feedback():
    run = MixtureDataset(make_sources(), {"general": 1, "domain": 1}, None, num_draws=2000, seed=1)
    run.set_feedback({"tax": 4.0, "general": 0.5})
    state = run.state_dict()
    resumed = MixtureDataset(make_sources(), {"general": 1, "domain": 1}, None, num_draws=2000, seed=1)
    resumed.load_state_dict(state)
    assert [resumed[i] for i in range(1000, 1200)] == [run[i] for i in range(1000, 1200)]
    other = MixtureDataset(make_sources(), {"general": 1, "domain": 1}, None, num_draws=2000, seed=2)
    with pytest.raises(DataError, match="saved seed 1 differs from the current 2"):
        other.load_state_dict(state)


def test_feedback_validation_and_source_multipliers():
    ds = MixtureDataset(make_sources(), {"general": 1, "domain": 1}, None, num_draws=100, seed=0)
    assert ds.groups() == ["general", "domain", "bonds", "rates", "tax"]
    with pytest.raises(DataError, match="'medical', which is neither a source nor a bucket"):
        ds.set_feedback({"medical": 2.0})
    with pytest.raises(DataError, match="must be a positive number"):
        ds.set_feedback({"tax": 0.0})
    ds.set_feedback({"domain": 3.0})
    assert ds.probabilities(0.5) == pytest.approx({"general": 0.25, "domain": 0.75})


def test_bad_mixture_configs():
    with pytest.raises(ConfigError, match="schedule source 'medical' is not a source"):
        MixtureDataset(make_sources(), {"general": 1, "domain": 1}, RatioSchedule("linear", "medical", 0.3, 0.7))
    with pytest.raises(ConfigError, match="needs a weight"):
        MixtureDataset(make_sources(), {"general": 1}, None)
    with pytest.raises(ConfigError, match="kind 'step' is unknown"):
        RatioSchedule("step")
    with pytest.raises(ConfigError, match="use kind 'linear' or 'cosine'"):
        RatioSchedule("constant", "domain", 0.3, 0.7)
    with pytest.raises(DataError, match="source 'domain' has no examples"):
        MixtureDataset({"general": [{"row_id": 0}], "domain": []}, {"general": 1, "domain": 1}, None)


def reference_reweight(gaps, current, sharpness):
    """Multiplicative weights on scale-free gaps, no floor."""
    scale = sum(abs(g) for g in gaps.values()) / len(gaps)
    raw = {k: current[k] * math.exp(sharpness * gaps[k] / scale) for k in current}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def test_reweight_by_gap_matches_reference_and_is_scale_free():
    import random

    rng = random.Random(0)
    for _ in range(20):
        keys = [f"g{i}" for i in range(rng.randint(2, 6))]
        gaps = {k: rng.uniform(0.1, 2.0) for k in keys}
        raw = {k: rng.uniform(0.5, 1.5) for k in keys}
        current = {k: v / sum(raw.values()) for k, v in raw.items()}
        got = reweight_by_gap(gaps, current, sharpness=0.5, min_weight=0.0)
        assert got == pytest.approx(reference_reweight(gaps, current, 0.5), rel=1e-9)
        assert reweight_by_gap({k: 10 * g for k, g in gaps.items()}, current, sharpness=0.5, min_weight=0.0) \
            == pytest.approx(got, rel=1e-9)


def test_reweight_by_gap_bounds_and_defaults():
    even = {"a": 0.25, "b": 0.25, "c": 0.5}
    assert reweight_by_gap({"a": 1, "b": 1, "c": 1}, even) == pytest.approx(even)
    w = reweight_by_gap({"a": 0.0, "b": 0.0, "c": 50.0}, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3},
                        sharpness=5.0, min_weight=0.1)
    assert w["a"] == pytest.approx(0.1) and w["b"] == pytest.approx(0.1) and w["c"] == pytest.approx(0.8)
    assert sum(w.values()) == pytest.approx(1.0)
    partial = reweight_by_gap({"a": 2.0}, {"a": 0.5, "b": 0.5})  # a group without a gap counts as average
    assert partial == pytest.approx({"a": 0.5, "b": 0.5})
    with pytest.raises(DataError, match=r"gaps given for \['z'\]"):
        reweight_by_gap({"z": 1.0}, even)
    with pytest.raises(ConfigError, match="lower min_weight"):
        reweight_by_gap({"a": 1.0}, even, min_weight=0.5)


def test_planted_weak_bucket_gets_sampled_more():
    """At each evaluation the simulated student-teacher gap per bucket shrinks with the bucket's exposure;
    'tax' starts three times worse. Its sampling weight must rise, and no bucket may vanish."""
    ds = MixtureDataset(make_sources(), {"general": 1, "domain": 1}, None, num_draws=6000, seed=0)
    buckets = ["rates", "tax", "bonds"]
    base_gap = {"rates": 1.0, "tax": 3.0, "bonds": 1.0}
    exposure = dict.fromkeys(buckets, 0)
    tax_share, weights = [], ds.current_feedback(buckets)
    for window in range(6):
        drawn = [ds[i].get("bucket") for i in range(window * 1000, (window + 1) * 1000)]
        counts = {b: drawn.count(b) for b in buckets}
        tax_share.append(counts["tax"] / sum(counts.values()))
        for b in buckets:
            exposure[b] += counts[b]
        gaps = {b: base_gap[b] / (1 + exposure[b] / 500) for b in buckets}
        weights = reweight_by_gap(gaps, ds.current_feedback(buckets), sharpness=1.0, min_weight=0.1)
        ds.set_feedback(weights)
    assert tax_share[0] == pytest.approx(1 / 3, abs=0.05)
    assert max(tax_share[1:]) > 0.5 and tax_share[1] > tax_share[0]
    assert min(weights.values()) >= 0.1 - 1e-12


def _rows_by_source(ds, indices):
    """Per source name, its row ids in the order the items `indices` drew them."""
    drawn = {name: [] for name in ds.names}
    for i in indices:
        source_index, row_id = split_example_id(ds[i]["example_id"])
        drawn[ds.names[source_index]].append(row_id)
    return drawn


def test_single_source_epochs_yield_each_row_exactly_that_many_times():
    from lmdistill.config import config_from_dict
    from lmdistill.train.stage import build_train_dataset

    config = config_from_dict({"data": {"sources": {"domain": {"path": "domain.jsonl"}}},
                               "training": {"batch_size": 4}, "stages": [{"name": "a", "epochs": 3}]})
    rows = [{"input_ids": [i], "row_id": i} for i in range(37)]
    ds = build_train_dataset(config, config.stages[0], {"domain": rows})
    assert len(ds) == 3 * 37
    ids = _rows_by_source(ds, range(len(ds)))["domain"]
    passes = [ids[k * 37:(k + 1) * 37] for k in range(3)]
    for drawn in passes:  # each pass is every row once: rows repeat only after all were drawn
        assert sorted(drawn) == list(range(37))
    assert passes[0] != passes[1] != passes[2] and passes[0] != list(range(37))  # reshuffled every pass


def test_mixed_sources_are_each_walked_without_replacement():
    sources = make_sources()
    ds = MixtureDataset(sources, {"general": 1, "domain": 1}, RatioSchedule("linear", "domain", 0.3, 0.7),
                        num_draws=1000, seed=5)
    for name, drawn in _rows_by_source(ds, range(1000)).items():
        size = len(sources[name])
        ids = sorted(row["row_id"] for row in sources[name])
        full = len(drawn) // size
        assert full >= 7
        for k in range(full):
            assert sorted(drawn[k * size:(k + 1) * size]) == ids, (name, k)
        assert len(set(drawn[full * size:])) == len(drawn) - full * size  # the last, partial pass repeats nothing


def test_feedback_applies_from_the_next_unread_round_and_resume_replays_it():
    def fresh():
        return MixtureDataset(make_sources(), {"general": 1, "domain": 1}, None, num_draws=3000, seed=4, round_size=8)

    run = fresh()
    first = [run[i] for i in range(1003)]
    run.set_feedback({"general": 9.0})
    run.set_feedback({"tax": 5.0})
    rest = [run[i] for i in range(1003, 3000)]
    assert run.state_dict()["feedback"] == [[1008, {"general": 9.0, "tax": 5.0}]]
    assert [run[i] for i in range(1003)] == first  # what was read keeps its weights
    general = [split_example_id(item["example_id"])[0] == 0 for item in rest[5:]]
    assert sum(general) / len(general) == pytest.approx(0.9, abs=0.01)
    tax = [item.get("bucket") == "tax" for item in rest[5:] if "bucket" in item]
    assert sum(tax) / len(tax) == pytest.approx(5 / 7, abs=0.05)
    resumed = fresh()
    resumed.load_state_dict(run.state_dict())
    assert [resumed[i] for i in range(2000, 3000)] == rest[997:]
    again = fresh()
    assert [again[i] for i in range(1003)] == first  # same seed, same items


@pytest.mark.parametrize("sizes", [(30, 10), (37, 11, 5)])
def test_sources_without_weights_are_read_every_row_once_per_epoch(sizes):
    from lmdistill.config import config_from_dict
    from lmdistill.train.stage import build_train_dataset

    names = [f"s{i}" for i in range(len(sizes))]
    config = config_from_dict({"data": {"sources": {n: {"path": f"{n}.jsonl"} for n in names}},
                               "training": {"batch_size": 4}, "stages": [{"name": "a", "epochs": 2}]})
    sources = {n: [{"input_ids": [i], "row_id": i} for i in range(size)] for n, size in zip(names, sizes)}
    ds = build_train_dataset(config, config.stages[0], sources)
    drawn = _rows_by_source(ds, range(len(ds)))
    for name, size in zip(names, sizes):  # two epochs: every row of every source twice (not each source alike)
        assert sorted(drawn[name]) == sorted(2 * list(range(size))), name
