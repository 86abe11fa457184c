"""Stages with teacher_source: cache: equal to the live teacher at k = V, close at k = 64, never load the teacher,
and refuse a cache that does not match the run."""

import json
import shutil

import pytest
import torch

from lmdistill.config import config_from_dict
from lmdistill.errors import CacheError
from lmdistill.teacher.stage import open_stage_cache
from lmdistill.train import prepare as prepare_module
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.prepare import prepare
from teacher_configs import config_dict

KD = [{"name": "forward_kl", "weight": 0.7}, {"name": "cross_entropy", "weight": 0.3}]
STAGE = {"name": "s", "max_steps": 3, "gradient_accumulation_steps": 2, "temperature": 2.0, "losses": KD,
         "eval_steps": 2}


def _history(run_dir) -> tuple[list[float], list[float]]:
    history = json.loads((run_dir / "s" / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h]


@pytest.fixture(scope="module")
def live_run(tmp_path_factory, fixture_paths):
    """The reference: the same stage with the teacher in memory."""
    run_dir = tmp_path_factory.mktemp("live") / "run"
    return _history(run_pipeline(config_from_dict(config_dict(fixture_paths, run_dir, [STAGE]))))


def _cached_run(teacher_config, tmp_path, cache, monkeypatch, name):
    def no_teacher(*args, **kwargs):
        raise AssertionError("a cached stage loaded the teacher")

    monkeypatch.setattr(prepare_module, "frozen_teacher", no_teacher)
    stage = {**STAGE, "teacher_source": "cache"}
    config = config_from_dict(teacher_config([stage], output_dir=str(tmp_path / name),
                                             teacher_cache={"path": str(cache)}))
    return _history(run_pipeline(config))


def test_k_equal_v_cache_trains_exactly_like_the_live_teacher(live_run, teacher_config, tmp_path, exact_cache,
                                                              monkeypatch):
    # Shuffled mixture draws, accumulation over 2 micro-batches, T = 2 over a T = 1 capture, eval on cached eval rows.
    losses, evals = _cached_run(teacher_config, tmp_path, exact_cache, monkeypatch, "cached")
    assert len(losses) == 3 and len(evals) >= 2
    assert losses == pytest.approx(live_run[0], rel=1e-5)
    assert evals == pytest.approx(live_run[1], rel=1e-5)


def test_top64_fp16_cache_trains_within_5_percent(live_run, teacher_config, tmp_path, topk_cache, monkeypatch):
    losses, evals = _cached_run(teacher_config, tmp_path, topk_cache, monkeypatch, "top64")
    assert losses == pytest.approx(live_run[0], rel=0.05)
    assert evals == pytest.approx(live_run[1], rel=0.05)


def _open(config_dict):
    config = config_from_dict(config_dict)
    prep = prepare(config, load_teacher=False)
    return open_stage_cache(config, prep, config.stages[0], list(prep.sources), 10**6)


def test_matching_run_opens(teacher_config, topk_cache):
    lookup, eval_examples, vocab = _open(teacher_config(teacher_cache={"path": str(topk_cache)}))
    assert vocab == lookup.cache.manifest.vocab_size and all("example_id" in ex for ex in eval_examples)


def test_a_row_that_trains_nothing_looks_nothing_up(teacher_config, topk_cache):
    """A row whose labels are all -100 (a filler completing the processes' last round, data/rounds.py) gets zeros,
    not a "data no longer matches" error; a row whose counted tokens changed still gets one."""
    lookup, eval_examples, _ = _open(teacher_config(teacher_cache={"path": str(topk_cache)}))
    example = eval_examples[0]
    labels = torch.tensor([example["labels"][1:]])  # after the causal shift
    ids, logprobs, tail = lookup.lookup({"example_id": torch.tensor([example["example_id"]] * 2)},
                                        torch.cat([labels, torch.full_like(labels, -100)]))
    assert logprobs[0].any() and not ids[1].any() and not logprobs[1].any() and not tail[1].any()
    changed = labels.clone()
    changed[0, int((labels[0] != -100).nonzero()[0])] = -100
    with pytest.raises(CacheError, match="the data no longer matches"):
        lookup.lookup({"example_id": torch.tensor([example["example_id"]])}, changed)


def test_other_tokenizer_is_refused(teacher_config, topk_cache, fixture_paths, tmp_path):
    student = shutil.copytree(fixture_paths["student"], tmp_path / "student")
    tokenizer_config = student / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text())
    data["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    tokenizer_config.write_text(json.dumps(data))
    (student / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(CacheError, match="was made with a different tokenizer"):
        _open(teacher_config(student={"name": str(student)}, teacher_cache={"path": str(topk_cache)}))


def test_max_length_change_is_refused(teacher_config, topk_cache):
    with pytest.raises(CacheError, match="captured with data.max_length=32, this run uses 40"):
        _open(teacher_config(teacher_cache={"path": str(topk_cache)},
                             data={**teacher_config()["data"], "max_length": 40}))


def test_changed_data_is_refused(teacher_config, topk_cache):
    data = teacher_config()["data"]
    data["sources"]["domain"]["max_rows"] = 20
    with pytest.raises(CacheError, match="the data of 'domain' changed since capture"):
        _open(teacher_config(teacher_cache={"path": str(topk_cache)}, data=data))


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupted", "incomplete"])
def test_damaged_shards_are_named(teacher_config, topk_cache, tmp_path, damage):
    cache = shutil.copytree(topk_cache, tmp_path / "cache")
    shard = cache / "shard-001-00001.safetensors"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "corrupted":
        raw = bytearray(shard.read_bytes())
        raw[-10] ^= 0xFF
        shard.write_bytes(bytes(raw))
    else:
        manifest = json.loads((cache / "manifest.json").read_text())
        manifest["shards"] = [s for s in manifest["shards"] if s["file"] != shard.name]
        (cache / "manifest.json").write_text(json.dumps(manifest))
    expected = {"missing": f"shard {shard} is missing", "truncated": f"shard {shard} is truncated",
                "corrupted": f"shard {shard} is corrupted", "incomplete": "is incomplete \\(4 of 5 shards"}[damage]
    with pytest.raises(CacheError, match=expected) as err:
        lookup, _, _ = _open(teacher_config(teacher_cache={"path": str(cache)}))
        lookup.cache.example("domain", 15)  # checksums are verified on first read
    assert "\n" not in str(err.value)
