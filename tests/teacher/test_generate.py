"""generate: provenance, resume after a kill mid-write, and stages that train on the generations."""

import json

import pytest

from lmdistill.config import config_from_dict
from lmdistill.data.cache import tokenizer_hash
from lmdistill.errors import DataError
from lmdistill.train.teacher_commands import generate
from lmdistill.teacher.generate import load_generations
from lmdistill.train import prepare
from lmdistill.train.pipeline import run_pipeline

GENERATION = {"sources": ["domain"], "num_samples": 2, "max_new_tokens": 6, "batch_size": 4, "temperature": 0.8}


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_writes_provenance_and_resumes(teacher_config, tmp_path, tokenizer):
    config = config_from_dict(teacher_config(generation=GENERATION, data={
        **teacher_config()["data"], "sources": {**teacher_config()["data"]["sources"],
                                                "domain": {**teacher_config()["data"]["sources"]["domain"],
                                                           "max_rows": 6}}}))
    path, written = generate(config)
    lines = _lines(path)
    assert written == len(lines) == 12
    assert sorted((l["row_id"], l["sample"]) for l in lines) == [(r, s) for r in range(6) for s in range(2)]
    first = lines[0]
    assert first["teacher"] == config.teacher.name and first["source"] == "domain"
    assert first["settings"] == {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "max_new_tokens": 6, "do_sample": True}
    assert isinstance(first["seed"], int) and first["tokenizer"] == tokenizer_hash(tokenizer)
    for line in lines:
        assert 0 < len(line["completion_ids"]) <= 6
        assert line["finished"] == (line["completion_ids"][-1] == tokenizer.eos_token_id)
        assert line["prompt"] == tokenizer.decode(line["prompt_ids"])
        assert "assistant" in line["prompt"]  # the chat-templated prompt the teacher answered

    # killed mid-write: 5 whole lines (row 2 has one of its two samples) and half of the sixth
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:5]) + text[5][:20])
    _, written = generate(config)
    lines = _lines(path)
    assert written == 8  # rows 2..5, both samples; rows 0 and 1 kept as they were
    assert lines[:4] == [json.loads(t) for t in text[:4]]
    assert sorted((l["row_id"], l["sample"]) for l in lines) == [(r, s) for r in range(6) for s in range(2)]
    assert generate(config)[1] == 0  # complete: nothing to do



def test_greedy_generation_answers_each_prompt_once_whatever_num_samples(teacher_config, tmp_path, caplog):
    """Greedy decoding gives the same answer every time: num_samples 2 with do_sample false writes one line a row
    (transformers refuses several greedy return sequences), and says why."""
    path = tmp_path / "gen.jsonl"
    config = config_from_dict(teacher_config(generation={**GENERATION, "do_sample": False, "max_new_tokens": 3,
                                                         "path": str(path)}))
    caplog.set_level("WARNING")
    _, written = generate(config)
    lines = _lines(path)
    assert written == len(lines) == len({l["row_id"] for l in lines}) > 0
    assert {l["sample"] for l in lines} == {0}
    assert "generation.num_samples is 2, but do_sample is false: greedy decoding answers a prompt the same way " \
           "every time, so each gets one generation" in caplog.text
    assert generate(config)[1] == 0  # complete with one line a row: nothing to do on a rerun

@pytest.fixture
def generations_file(teacher_config, tmp_path):
    config = config_from_dict(teacher_config(generation={**GENERATION, "path": str(tmp_path / "gen.jsonl"),
                                                         "num_samples": 1, "max_new_tokens": 8}))
    return generate(config)[0]


def test_generations_stage_trains_on_teacher_text_without_the_teacher(teacher_config, generations_file, tokenizer,
                                                                      monkeypatch):
    monkeypatch.setattr(prepare, "frozen_teacher", lambda *a, **k: (_ for _ in ()).throw(AssertionError("teacher")))
    examples = load_generations(generations_file, tokenizer_hash(tokenizer), 32, "causal")
    lines = _lines(generations_file)
    assert examples[0]["input_ids"] == lines[0]["prompt_ids"] + lines[0]["completion_ids"]
    assert examples[0]["labels"][len(lines[0]["prompt_ids"]):] == lines[0]["completion_ids"]
    assert set(examples[0]["labels"][:len(lines[0]["prompt_ids"])]) == {-100}
    stage = {"name": "s", "max_steps": 2, "teacher_source": "generations", "losses": [{"name": "cross_entropy"}]}
    config = config_from_dict(teacher_config([stage], generation={"path": str(generations_file)}))
    history = json.loads((run_pipeline(config) / "s" / "log_history.json").read_text())
    assert [h["loss"] for h in history if "loss" in h]


def test_generations_stage_with_live_kd_and_bad_file(teacher_config, generations_file, tmp_path, tokenizer):
    stage = {"name": "s", "max_steps": 1, "teacher_source": "generations",
             "losses": [{"name": "forward_kl", "weight": 0.5}, {"name": "cross_entropy", "weight": 0.5}]}
    config = config_from_dict(teacher_config([stage], generation={"path": str(generations_file)}))
    history = json.loads((run_pipeline(config) / "s" / "log_history.json").read_text())
    assert any("loss/forward_kl" in h for h in history)
    other = tmp_path / "other.jsonl"
    other.write_text(generations_file.read_text().replace('"tokenizer": "', '"tokenizer": "x'))
    with pytest.raises(DataError, match="line 1 was generated with another tokenizer"):
        load_generations(other, tokenizer_hash(tokenizer), 32, "causal")


def test_a_sharded_teacher_needs_complete_generations(teacher_config, tmp_path):
    """A sharded teacher cannot generate inside `run` (its forwards are collective): the stage needs the whole file
    from `lmdistill generate`, and a partial one is refused with the number of missing rows."""
    from lmdistill.errors import ConfigError
    from lmdistill.teacher.generations import ensure_generations

    config = config_from_dict(teacher_config(generation={**GENERATION, "path": str(tmp_path / "gen.jsonl"),
                                                         "num_samples": 1, "max_new_tokens": 4}))
    path, _ = generate(config)
    prep = prepare.prepare(config)
    prep.teacher._is_fsdp_managed_module = True  # what transformers marks a teacher it loaded sharded
    assert ensure_generations(config, prep) == path  # complete: used as it is
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))
    with pytest.raises(ConfigError, match=r"gen.jsonl lacks 2 rows and the teacher is sharded.*lmdistill generate"):
        ensure_generations(config, prep)


def test_finishing_a_file_with_other_sampling_settings_stops_naming_them(teacher_config, tmp_path, caplog):
    path = tmp_path / "gen.jsonl"

    def config(**generation):
        return config_from_dict(teacher_config(generation={**GENERATION, "num_samples": 1, "path": str(path),
                                                           **generation}))

    generate(config())
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]))  # killed after two rows
    with pytest.raises(DataError, match=r"^\S+gen.jsonl holds generations made with other settings \(temperature 0.8 "
                                        r"-> 0.3, top_k 0 -> 5\); delete it to generate again with these, or write "
                                        r"to another file \(--out, generation.path\)$"):
        generate(config(temperature=0.3, top_k=5))
    assert path.read_text() == "".join(lines[:2])  # nothing mixed in
    generate(config())  # the file's own settings finish it
    assert len(path.read_text().splitlines()) == len(lines)
    caplog.set_level("WARNING")
    assert generate(config(temperature=0.3))[1] == 0  # a finished file is used as it is, with a warning
    assert "made with other settings (temperature 0.8 -> 0.3)" in caplog.text
