"""A run directory keeps the settings it was made with: a re-run with others stops and names them; --restart
starts over."""

import json
import pytest
import yaml

from lmdistill.config import config_from_dict, save_config
from lmdistill.errors import ConfigError
from lmdistill.config import CONFIG_FILE
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.rerun import changed_keys, check_same_config


def _config(tmp_path, **stage):
    return config_from_dict({"output_dir": str(tmp_path / "run"), "stages": [{"name": "a", "max_steps": 1, **stage}],
                             "training": {"logging_steps": 10}})


def test_changed_keys_name_what_changes_results_only(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(_config(tmp_path), run_dir / CONFIG_FILE)
    assert changed_keys(run_dir, _config(tmp_path), CONFIG_FILE) == []
    logging_only = _config(tmp_path).model_copy(deep=True)
    logging_only.training.logging_steps, logging_only.training.report_to = 1, []
    logging_only.data.num_proc, logging_only.output_dir = 2, str(tmp_path / "moved")
    assert changed_keys(run_dir, logging_only, CONFIG_FILE) == []
    changed = _config(tmp_path, temperature=2.0, losses=[{"name": "reverse_kl"}])
    assert changed_keys(run_dir, changed, CONFIG_FILE) == [("stages[0].losses[0].name", "forward_kl", "reverse_kl"),
                                                           ("stages[0].temperature", 1.0, 2.0)]


@pytest.mark.parametrize("output", ["pipeline_state.json", "a", "student_init"])
def test_an_attempt_refused_before_it_ran_binds_nothing(tmp_path, output):
    """A run refused after its config was stored (a mistyped data path, a served teacher's refusal) left the config
    alone in the directory, and the corrected config was then refused as "run with other settings": now a stored
    config binds once the run wrote anything beside it (its state, a stage folder, the student it starts from)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(_config(tmp_path, losses=[{"name": "jsd"}]), run_dir / CONFIG_FILE)
    check_same_config(run_dir, _config(tmp_path), CONFIG_FILE)  # the corrected config runs
    (run_dir / output).mkdir()
    with pytest.raises(ConfigError, match=r"was run with other settings \(stages\[0\].losses\[0\].name: jsd -> "
                                          r"forward_kl\); pass --restart"):
        check_same_config(run_dir, _config(tmp_path), CONFIG_FILE)


def test_rerun_with_other_settings_stops_and_restart_starts_over(tiny_pipeline):
    data = tiny_pipeline([{"name": "a", "max_steps": 2, "save_steps": 1}], evaluation={"enabled": False})
    run_dir = run_pipeline(config_from_dict(data))
    assert (run_dir / "a" / "checkpoint-2").exists()
    data["stages"][0]["learning_rate"] = 1e-4
    with pytest.raises(ConfigError, match=r"was run with other settings \(stages\[0\]\.learning_rate: \(unset\) -> "
                                          r"0\.0001\); pass --restart"):
        run_pipeline(config_from_dict(data))
    (run_dir / "a" / "checkpoint-2" / "marker").write_text("old")
    run_pipeline(config_from_dict(data), restart=True)
    assert not (run_dir / "a" / "checkpoint-2" / "marker").exists()  # trained anew, not resumed
    stored = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    assert stored["stages"][0]["learning_rate"] == 1e-4
    assert [s["status"] for s in json.loads((run_dir / "pipeline_state.json").read_text())["stages"]] == ["done"]
