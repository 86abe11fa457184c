"""cache-teacher with several teachers: the cache holds the target a stage trains on (the weighted mixture at the
stage temperature, or a routed source's own teacher), a cached stage trains like the live mixture without loading a
teacher, and a run whose teachers differ from the cache's is refused."""

import json
import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.config import config_from_dict
from lmdistill.errors import CacheError, ConfigError
from lmdistill.models.tiny import tiny_causal_lm
from lmdistill.teacher.reader import TeacherCache
from lmdistill.teacher.stage import open_stage_cache
from lmdistill.train import prepare as prepare_module, stage_models
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.prepare import prepare
from lmdistill.train.teacher_commands import cache_teacher
from teacher_configs import config_dict

KD = [{"name": "forward_kl", "weight": 0.7}, {"name": "cross_entropy", "weight": 0.3}]
K = 16


@pytest.fixture(scope="module")
def third_teacher(tmp_path_factory, fixture_paths, tokenizer):
    """A third model of the shared vocabulary (the fixtures' teacher and student are the other two)."""
    path = tmp_path_factory.mktemp("third_teacher")
    tiny_causal_lm(len(tokenizer), num_layers=2, hidden_size=64, seed=7).save_pretrained(path)
    AutoTokenizer.from_pretrained(fixture_paths["teacher"]).save_pretrained(path)
    return path


def _mixture_config(paths: dict, out, weights, routes=None, temperature=1.0, k=K, stage=None, **cache):
    """A config whose `teachers:` are the fixtures' teacher, student and third model (as many as weights)."""
    models = [paths["teacher"], paths["student"], paths.get("third")][:len(weights)]
    teachers = [{"name": str(m), "weight": w, **({"sources": routes[i]} if routes and i in routes else {})}
                for i, (m, w) in enumerate(zip(models, weights))]
    stage = stage or {"name": "s", "max_steps": 2, "teacher_source": "cache", "temperature": temperature}
    data = config_dict(paths, out / "run", [stage], teachers=teachers,
                       teacher_cache={"k": k, "dtype": "float32", "temperature": temperature,
                                      "path": str(out / "cache"), **cache})
    del data["teacher"]
    return config_from_dict(data)


def _reference(models, weights, example, temperature, vocab) -> torch.Tensor:
    """log sum_k w_k softmax(z_k / T) in float64 over the counted tokens of one unpadded example, normalised over
    the shared vocabulary as the losses compare it."""
    counted = torch.tensor(example["labels"][1:]) != -100
    with torch.no_grad():
        logits = [m(torch.tensor([example["input_ids"]])).logits[0, :-1][counted].double() for m in models]
    rows = min(z.shape[-1] for z in logits)
    shares = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    mixed = sum(w * torch.softmax(z[:, :rows] / temperature, dim=-1) for w, z in zip(shares, logits)).log()
    return torch.log_softmax(mixed[:, :vocab], dim=-1)


CASES = {  # weights, routing (teacher index -> sources), temperature
    "two teachers 1:3": ([1.0, 3.0], None, 1.0),
    "two teachers 2:1 at T=2": ([2.0, 1.0], None, 2.0),
    "three teachers": ([0.2, 0.5, 0.3], None, 1.0),
    "three teachers, domain routed to the third": ([1.0, 2.0, 1.0], {2: ["domain"]}, 1.5),
}


@pytest.mark.parametrize("case", CASES)
def test_cached_mixture_topk_equals_a_float64_reference(case, tmp_path, fixture_paths, third_teacher, vocab_size):
    weights, routes, temperature = CASES[case]
    paths = {**fixture_paths, "third": third_teacher}
    config = _mixture_config(paths, tmp_path, weights, routes, temperature)
    folder, manifest = cache_teacher(config)
    assert [(t.weight, t.sources) for t in manifest.teachers] == [
        (w / sum(weights), (routes or {}).get(i, [])) for i, w in enumerate(weights)]
    assert manifest.temperature == temperature and all(t.config_hash and t.dtype == "float32"
                                                       for t in manifest.teachers)
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in
              (paths["teacher"], paths["student"], paths["third"])[:len(weights)]]
    prep = prepare(config, load_teacher=False)
    cache = TeacherCache(folder)
    routed = {source: i for i, names in (routes or {}).items() for source in names}
    unrouted = [i for i in range(len(weights)) if i not in routed.values()]
    for key, rows, position in (("general", prep.sources["general"], 3), ("domain", prep.sources["domain"], 12),
                                ("eval:domain", prep.eval_sets["domain"], 1)):
        source = key.removeprefix("eval:")
        chosen = [routed[source]] if source in routed else unrouted  # a routed source: its teacher alone
        ref = _reference([models[i] for i in chosen], [weights[i] for i in chosen], rows[position], temperature,
                         vocab_size)
        ids, logprobs, tail = cache.example(key, position)
        ref_top = ref.topk(K, dim=-1).values
        torch.testing.assert_close(logprobs.double(), ref_top, atol=2e-5, rtol=0)  # the k largest, in order
        torch.testing.assert_close(logprobs.double(), ref.gather(-1, ids), atol=2e-5, rtol=0)  # at those ids
        torch.testing.assert_close(tail.double(), 1 - ref_top.exp().sum(-1), atol=2e-5, rtol=0)


STAGE = {"name": "s", "max_steps": 3, "gradient_accumulation_steps": 2, "temperature": 2.0, "losses": KD,
         "eval_steps": 2}


def _losses(run_dir) -> tuple[list[float], list[float]]:
    history = json.loads((run_dir / "s" / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h]


def test_k_equal_v_cached_mixture_trains_like_the_live_mixture(tmp_path, fixture_paths, vocab_size, monkeypatch,
                                                               caplog):
    live = _mixture_config(fixture_paths, tmp_path / "live", [2.0, 1.0], temperature=2.0,
                           stage={**STAGE, "teacher_source": "live"})
    expected = _losses(run_pipeline(live))
    cached = _mixture_config(fixture_paths, tmp_path / "cached", [2.0, 1.0], temperature=2.0, k=vocab_size,
                             stage={**STAGE, "teacher_source": "cache"})
    cache_teacher(cached)

    def no_teacher(*args, **kwargs):
        raise AssertionError("a cached stage with several teachers loaded a teacher")

    monkeypatch.setattr(prepare_module, "frozen_teacher", no_teacher)
    monkeypatch.setattr(stage_models, "frozen_teacher", no_teacher)
    with caplog.at_level(logging.INFO):
        losses, evals = _losses(run_pipeline(cached))
    assert "stage s: teachers resident: none; this stage distils from the teacher cache" in caplog.text
    assert len(losses) == 3 and len(evals) >= 2
    assert losses == pytest.approx(expected[0], rel=1e-5)
    assert evals == pytest.approx(expected[1], rel=1e-5)


@pytest.fixture(scope="module")
def small_mixture_cache(tmp_path_factory, fixture_paths):
    """A k = 4 cache of two teachers at weights 1:3."""
    out = tmp_path_factory.mktemp("mixture")
    return cache_teacher(_mixture_config(fixture_paths, out, [1.0, 3.0], k=4))[0]


def _open(config):
    prep = prepare(config, load_teacher=False)
    return open_stage_cache(config, prep, config.stages[0], list(prep.sources), 10**6)


@pytest.mark.parametrize("weights,routes,match", [
    ([1.0, 1.0], None, r"teacher 1 \(.*teacher.*\) has weight \(share of the mixture\) 0.25 in the cache but 0.5 in "
                       r"this run: capture it again"),
    ([1.0, 3.0], {1: ["domain"]}, r"teacher 2 \(.*student.*\) has routed sources \[\] in the cache but \['domain'\]"),
    ([1.0, 3.0, 1.0], None, "holds the mixture of 2 teachers .*, this run mixes 3"),
])
def test_a_run_with_other_teachers_is_refused(weights, routes, match, small_mixture_cache, tmp_path, fixture_paths,
                                              third_teacher):
    config = _mixture_config({**fixture_paths, "third": third_teacher}, tmp_path, weights, routes, k=4,
                             path=str(small_mixture_cache))
    with pytest.raises(CacheError, match=match) as err:
        _open(config)
    assert "\n" not in str(err.value)
    assert _open(_mixture_config(fixture_paths, tmp_path, [2.0, 6.0], k=4, path=str(small_mixture_cache)))  # 1:3


def test_one_teacher_and_a_mixture_cache_are_not_mixed_up(small_mixture_cache, topk_cache, teacher_config,
                                                          fixture_paths, tmp_path):
    with pytest.raises(CacheError, match="holds the mixture of 2 teachers .*, but this run has one teacher"):
        _open(config_from_dict(teacher_config([{"name": "s", "teacher_source": "cache"}],
                                              teacher_cache={"path": str(small_mixture_cache)})))
    with pytest.raises(CacheError, match="holds one teacher's top-k .*, but this run mixes 2 teachers"):
        _open(_mixture_config(fixture_paths, tmp_path, [1.0, 3.0], temperature=2.0, path=str(topk_cache)))


def test_a_mixture_is_captured_at_the_temperature_its_stages_train_at(fixture_paths, tmp_path):
    # (a config whose cached stages train at another temperature than teacher_cache's is refused at load:
    # test_several_teachers.py)
    config = _mixture_config(fixture_paths, tmp_path, [1.0, 1.0], temperature=2.0)
    with pytest.raises(ConfigError, match="at temperature 2.0, and a mixture captured at 1.0 cannot be re-tempered"):
        cache_teacher(config, temperature=1.0)
