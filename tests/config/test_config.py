"""Config: presets validate, numbers are numbers, bad keys and values fail at load with the key path."""

import json

import pytest
import yaml

from lmdistill.cli import PRESETS, preset_text
from lmdistill.config import _Yaml12Loader, config_from_dict, load_config, save_config
from lmdistill.overrides import apply_overrides
from lmdistill.errors import ConfigError


def minimal(**stage):
    return {"stages": [{"name": "s1", **stage}]}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_loads_and_validates(preset, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(preset_text(preset))
    config = load_config(path)
    assert config.stages
    assert "#" in preset_text(preset)  # commented for the user


def test_multistage_preset_matches_seed_stages(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(preset_text("multistage"))
    config = load_config(path)
    s1, s2, s3 = config.stages
    assert [s.temperature for s in config.stages] == [4.0, 2.0, 1.0]
    assert s2.mixture.schedule.start == 0.3 and s2.mixture.schedule.end == 0.7
    assert {t.name for t in s2.losses} >= {"forward_kl", "cross_entropy", "feature", "attention"}
    assert s3.eval_driven_sampling.enabled
    assert s1.learning_rate > s3.learning_rate


def test_scientific_notation_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stages:\n  - name: a\n    learning_rate: 5e-5\ntraining:\n  learning_rate: 1E-4\n")
    config = load_config(path)
    assert config.stages[0].learning_rate == pytest.approx(5e-5)
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert yaml.load("x: 3", Loader=_Yaml12Loader) == {"x": 3}


def test_json_config_roundtrip(tmp_path):
    config = config_from_dict(minimal(temperature=2.0))
    path = tmp_path / "c.json"
    save_config(config, path)
    assert json.loads(path.read_text())["stages"][0]["temperature"] == 2.0
    assert load_config(path) == config


@pytest.mark.parametrize("data, message", [
    (minimal(temperature="hot"), "stages[0].temperature: Input should be a valid number"),
    (minimal(tempreature=2), "stages[0].tempreature: unknown key"),
    ({"stages": []}, "stages: the stage list is empty"),
    ({"stages": [{"name": "a"}], "teachr": {}}, "teachr: unknown key"),
    (minimal(losses=[{"name": "feature", "wieght": 1}]), "stages[0].losses[0].wieght: unknown key"),
    (minimal(losses=[{"name": "forward_kl", "beta": 0.5}]), "beta applies to jsd only"),
    (minimal(temperature=0), "stages[0].temperature: Input should be greater than 0"),
    ({"stages": [{"name": "a", "mixture": {"weights": {"domain": 1}}}]}, "names source 'domain'"),
    ({"stages": [{"name": "a"}, {"name": "a"}]}, "repeated: ['a']"),
    (minimal(kind="finetune", losses=[{"name": "forward_kl"}]), "finetune stage trains on cross_entropy only"),
])
def test_bad_config_names_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, source="c.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("c.yaml: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("data, message", [
    ({**minimal(), "training": {"batch_size": "8"}},
     'training.batch_size: Input should be a valid integer, got "8" (write numbers unquoted'),
    (minimal(temperature=True), "stages[0].temperature: Input should be a valid number, got true"),
    ({**minimal(), "training": {"fp16": "yes"}}, 'training.fp16: Input should be a valid boolean, got "yes"'),
    (minimal(max_steps=10.0), "stages[0].max_steps: Input should be a valid integer"),
    (minimal(losses=[{"name": "feature", "layers": [["0", 1]]}]), "stages[0].losses[0].layers"),
])
def test_wrong_types_are_errors_not_conversions(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, source="c.yaml")
    assert str(err.value).startswith(f"c.yaml: {message}")
    assert "\n" not in str(err.value)


def test_strict_types_keep_what_yaml_writes(tmp_path):
    """An integer is a valid float, and a layer pair is the list YAML writes."""
    path = tmp_path / "c.yaml"
    path.write_text("stages:\n  - name: a\n    temperature: 2\n    epochs: 3\n"
                    "    losses: [{name: feature, layers: [[0, 1], [1, 3]]}]\n")
    stage = load_config(path).stages[0]
    assert stage.temperature == 2.0 and isinstance(stage.temperature, float) and stage.epochs == 3.0
    assert stage.losses[0].layers == [(0, 1), (1, 3)]


def test_fused_stage_may_read_a_teacher_cache():
    """The fused loss scores the cache's top-k rows chunk by chunk (tests/teacher/test_cache_fused.py)."""
    stage = config_from_dict(minimal(fused=True, teacher_source="cache")).stages[0]
    assert stage.fused and stage.teacher_source == "cache"


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(empty)


def test_overrides_reach_every_stage_and_section():
    raw = {"stages": [{"name": "a", "learning_rate": 1e-3}, {"name": "b"}], "data": {"sources": {}}}
    out = config_from_dict(apply_overrides(raw, {
        "learning_rate": 2e-4, "temperature": 3.0, "teacher_model": "T", "domain_dataset": "d.jsonl",
        "optimizer": "sgd", "use_lora": True, "use_wandb": True, "num_samples": 7, "vocab_chunk_size": 64}))
    assert [s.learning_rate for s in out.stages] == [2e-4, 2e-4]
    assert [s.temperature for s in out.stages] == [3.0, 3.0]
    assert [s.chunk_size for s in out.stages] == [64, 64]
    assert out.teacher.name == "T" and out.data.sources["domain"].path == "d.jsonl"
    assert out.data.sources["domain"].max_rows == 7
    assert out.training.optimizer == "sgd" and out.student.lora is not None
    assert out.training.report_to == ["tensorboard", "wandb"]
    assert raw["stages"][0]["learning_rate"] == 1e-3  # the caller's dict is untouched


def test_bad_override_value_is_an_error():
    with pytest.raises(ConfigError, match="training.optimizer"):
        config_from_dict(apply_overrides(minimal(), {"optimizer": "lion"}))


def test_an_entry_of_teachers_holds_the_fields_of_a_teacher_loaded_here_and_no_endpoint():
    from lmdistill.config import TeacherEntry, TeacherSettings

    assert not {name for name in TeacherEntry.model_fields if name.startswith("endpoint")}
    assert set(TeacherEntry.model_fields) - {"weight", "sources"} < set(TeacherSettings.model_fields)
    for served in ({"endpoint": "http://127.0.0.1:8000/v1"}, {"endpoint_timeout": 5}):
        with pytest.raises(ConfigError, match=r"teachers\[1\]: the teachers of a mixture are loaded in-process; only "
                                              r"the run's teacher can be served \(teacher.endpoint\)"):
            config_from_dict({**minimal(), "teachers": [{"name": "a"}, {"name": "b", **served}]})
    config = config_from_dict({**minimal(), "teachers": [{"name": "a", "shard": "never", "dtype": "bfloat16",
                                                          "weight": 2.0}, {"name": "b"}]})
    assert (config.teacher.name, config.teacher.shard, config.teacher.dtype) == ("a", "never", "bfloat16")
