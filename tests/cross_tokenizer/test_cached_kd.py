"""Logit KD across tokenizers from a teacher cache: what cache-teacher stores, training without the teacher (equal to
the live teacher at k = V, loss falls at small k, resumes), and caches that do not match the run."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.config import config_from_dict
from lmdistill.errors import CacheError, ConfigError
from lmdistill.train import pipeline, prepare as prepare_module
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.prepare import prepare

CACHED_TERMS = [{"name": "uld"}, {"name": "cross_vocab_kl"}, {"name": "cross_entropy", "weight": 0.5}]
STAGE = {"name": "s", "max_steps": 3, "gradient_accumulation_steps": 2, "temperature": 2.0, "eval_steps": 2,
         "learning_rate": 1e-2, "losses": CACHED_TERMS}


def _history(run_dir: Path, stage: str = "s") -> list[dict]:
    return json.loads((run_dir / stage / "log_history.json").read_text())


def _values(history: list[dict], key: str) -> list[float]:
    return [h[key] for h in history if key in h]


def _no_teacher(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a cached stage loaded the teacher")

    monkeypatch.setattr(prepare_module, "frozen_teacher", refuse)


def test_cache_holds_the_pairs_and_the_teachers_distribution_at_them(cross_config, cross_cache):
    from lmdistill.teacher.reader import TeacherCache
    from lmdistill.train.cross_tokenizer import teacher_views

    config = config_from_dict(cross_config([STAGE]))
    prep = prepare(config)
    viewed, _ = teacher_views(config, prep, prep.teacher_tokenizer, prep.sources, "test")
    cache = TeacherCache(cross_cache)
    assert cache.manifest.alignment and cache.manifest.vocab_size == prep.teacher.config.vocab_size
    for position, example in enumerate(viewed["domain"][:3]):
        pairs = cache.example_pairs("domain", position)
        assert pairs.tolist() == [list(p) for p in example["pairs"]] and len(pairs) > 3
        ids, logprobs, tail = cache.example("domain", position)
        with torch.no_grad():
            logits = prep.teacher(input_ids=torch.tensor([example["teacher_input_ids"]])).logits[0]
        expected = torch.log_softmax(logits[pairs[:, 1]], -1)
        assert torch.allclose(logprobs, expected.gather(-1, ids), atol=1e-4)
        assert torch.allclose(logprobs, expected.sort(-1, descending=True).values, atol=1e-4)
        assert (tail == 0).all()


def test_k_equal_v_cache_trains_like_the_live_teacher_without_loading_it(cross_config, cross_cache, tmp_path,
                                                                       monkeypatch):
    # Accumulation over 2 micro-batches, T = 2 over a T = 1 capture, eval on cached eval rows.
    live = _history(run_pipeline(config_from_dict(cross_config([STAGE], output_dir=str(tmp_path / "live")))))
    _no_teacher(monkeypatch)
    cached = _history(run_pipeline(config_from_dict(cross_config(
        [{**STAGE, "teacher_source": "cache"}], output_dir=str(tmp_path / "cached"),
        teacher_cache={"path": str(cross_cache)}))))
    for key in ("loss/uld", "loss/cross_vocab_kl", "loss", "eval_loss"):
        assert len(_values(cached, key)) >= 2 and _values(cached, key) == pytest.approx(_values(live, key), rel=1e-4)


def test_cached_uld_trains_through_lmdistill_run_and_the_loss_falls(cross_config, tmp_path, monkeypatch):
    stage = {"name": "s", "max_steps": 8, "learning_rate": 2e-2, "teacher_source": "cache", "save_steps": 4,
             "losses": [{"name": "uld"}]}
    data = cross_config([stage], training={"batch_size": 8}, teacher_cache={"k": 16, "path": str(tmp_path / "c")})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    built = CliRunner().invoke(app, ["cache-teacher", str(tmp_path / "c.yaml")])
    assert built.exit_code == 0, built.output[-3000:]
    _no_teacher(monkeypatch)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output[-3000:]
    values = _values(_history(Path(data["output_dir"])), "loss/uld")
    assert len(values) == 8 and sum(values[-3:]) < 0.8 * sum(values[:3]), values
    # Resume: the run killed after its checkpoint at step 4 continues with the same rows at steps 5..8.
    stage_dir = Path(data["output_dir"]) / "s"
    shutil.rmtree(stage_dir / "checkpoint-8")
    config = config_from_dict(data)
    pipeline.run_stage(config, prepare(config, load_teacher=False), 1, config.stages[0], Path(data["output_dir"]),
                       None)
    assert _values(_history(Path(data["output_dir"])), "loss/uld") == pytest.approx(values, rel=1e-5)


def _open(config_dict):
    from lmdistill.train.cross_cache import cached_cross_vocab

    config = config_from_dict(config_dict)
    prep = prepare(config, load_teacher=False)
    return cached_cross_vocab(config, prep, config.stages[0], list(prep.sources))


def _stage(**extra):
    return [{"name": "s", "max_steps": 1, "teacher_source": "cache", "losses": CACHED_TERMS, **extra}]


def _with_template(model_dir: Path, folder: Path) -> Path:
    """A copy of a model folder whose tokenizer has another chat template (so another tokenizer hash)."""
    copy = shutil.copytree(model_dir, folder)
    tokenizer_config = copy / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text())
    data["chat_template"] = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    tokenizer_config.write_text(json.dumps(data))
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    return copy


def test_matching_run_opens_and_looks_up_pairs(cross_config, cross_cache):
    teacher, eval_examples = _open(cross_config(_stage(), teacher_cache={"path": str(cross_cache)}))
    assert set(teacher.weights) == {"uld", "cross_vocab_kl"} and all("example_id" in ex for ex in eval_examples)
    example = eval_examples[0]
    labels = torch.tensor([example["labels"]])
    rows, positions, ids, logprobs, tail = teacher.lookup.lookup(torch.tensor([example["example_id"]]), labels)
    assert len(rows) == len(positions) == len(ids) > 0 and (labels[0, positions + 1] != -100).all()
    changed = labels.clone()
    changed[0, positions[0] + 1] = -100
    with pytest.raises(CacheError, match="has cached pairs at tokens the batch does not train on"):
        teacher.lookup.lookup(torch.tensor([example["example_id"]]), changed)
    # a row that trains nothing (a filler completing the processes' last round, data/rounds.py) has no pairs
    rows, *_ = teacher.lookup.lookup(torch.tensor([example["example_id"]] * 2),
                                     torch.cat([labels, torch.full_like(labels, -100)]))
    assert rows.tolist() == [0] * len(positions)


def test_cache_for_another_student_tokenizer_is_refused(cross_config, cross_cache, student_dir, tmp_path):
    student = _with_template(student_dir, tmp_path / "student")
    expected = f"was made with a different tokenizer than this run's (made for the student tokenizer of " \
               f"{student_dir}, this run's is {student})"
    with pytest.raises(CacheError, match=re.escape(expected)) as err:
        _open(cross_config(_stage(), student={"name": str(student)}, teacher_cache={"path": str(cross_cache)}))
    assert "\n" not in str(err.value)


def test_cache_of_another_teacher_tokenizer_is_refused(cross_config, cross_cache, metaspace_teacher_dir, tmp_path):
    teacher = _with_template(metaspace_teacher_dir, tmp_path / "teacher")
    expected = f"holds the top-k over the ids of teacher '{metaspace_teacher_dir}''s tokenizer, but this run's " \
               f"teacher '{teacher}' has another tokenizer"
    with pytest.raises(CacheError, match=re.escape(expected)):
        _open(cross_config(_stage(), teacher={"name": str(teacher)}, teacher_cache={"path": str(cross_cache)}))


def _edited(cache: Path, folder: Path, **fields) -> Path:
    copy = shutil.copytree(cache, folder)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, **fields}))
    return copy


def test_one_vocabulary_cache_is_refused_by_uld(cross_config, cross_cache, tmp_path):
    cache = _edited(cross_cache, tmp_path / "c", alignment=None, teacher_tokenizer_hash=None)
    with pytest.raises(CacheError, match="holds the teacher's log-probs over the student's own token ids"):
        _open(cross_config(_stage(), teacher_cache={"path": str(cache)}))


def test_cache_of_another_alignment_rule_is_refused(cross_config, cross_cache, tmp_path):
    cache = _edited(cross_cache, tmp_path / "c", alignment="older-rule")
    with pytest.raises(CacheError, match="paired its positions by the rule 'older-rule', this version pairs them"):
        _open(cross_config(_stage(), teacher_cache={"path": str(cache)}))


def test_cache_across_tokenizers_is_refused_by_forward_kl(cross_config, cross_cache):
    from lmdistill.teacher.stage import open_stage_cache

    config = config_from_dict(cross_config([{"name": "s", "max_steps": 1, "teacher_source": "cache"}],
                                           teacher_cache={"path": str(cross_cache)}))
    prep = prepare(config, load_teacher=False)
    with pytest.raises(CacheError, match="was captured across tokenizers .* only uld / cross_vocab_kl read it"):
        open_stage_cache(config, prep, config.stages[0], list(prep.sources), 10**6)


def test_config_refuses_id_by_id_kd_beside_a_cached_cross_vocabulary_loss(cross_config):
    with pytest.raises(ConfigError, match="a teacher cache for uld holds the teacher's top-k over its own ids, which "
                                          "forward_kl cannot compare"):
        config_from_dict(cross_config(_stage(losses=[{"name": "uld"}, {"name": "forward_kl"}])))


def test_cache_teacher_across_tokenizers_refuses_a_teacher_server(cross_config, tmp_path):
    from lmdistill.train.teacher_commands import cache_teacher

    config = config_from_dict(cross_config(_stage(), teacher={"endpoint": "http://127.0.0.1:9/v1"}))
    with pytest.raises(ConfigError, match="across tokenizers runs the teacher on its own tokens, which a teacher "
                                          "server is not asked for"):
        cache_teacher(config, out=tmp_path / "cache")
