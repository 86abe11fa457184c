"""`lmdistill run` with the strong-to-weak preset: --stage non_policy, policy, all and test; outputs and aliases."""

import json

import yaml
from typer.testing import CliRunner

from lmdistill.cli import app


def _run(tmp_path, config: dict, *flags):
    path = tmp_path / "s2w.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path), *map(str, flags)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _assert_model_dir(path):
    from transformers import AutoModelForCausalLM

    assert path.is_dir()
    assert AutoModelForCausalLM.from_pretrained(path).config.num_hidden_layers == 2


def test_stages_one_by_one_then_pretrained_student(tmp_path, s2w_config, tokenizer):
    config = s2w_config()
    run = tmp_path / "run"
    _run(tmp_path, config, "--stage", "non_policy")
    # Off-policy: the teacher's responses were generated on the fly, in both modes, and recorded per row.
    lines = [json.loads(t) for t in (run / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 16
    modes = [line["thinking"] for line in lines]
    assert 0 < sum(modes) < len(modes)
    for line in lines:
        switch = "<|im_start|>system\n/think<|im_end|>" if line["thinking"] else "<|im_start|>system\n/no_think<|im_end|>"
        assert line["prompt"].startswith(switch)
        assert line["prompt"] == tokenizer.decode(line["prompt_ids"])
    for name in ("best", "final", "best_model", "final_model"):
        _assert_model_dir(run / "non_policy" / name)
    assert (run / "non_policy" / "best_model").resolve() == (run / "non_policy" / "best").resolve()
    assert not (run / "policy").exists()

    _run(tmp_path, config, "--stage", "policy")
    history = json.loads((run / "policy" / "log_history.json").read_text())
    assert any(entry.get("onpolicy/student_share") == 1.0 for entry in history)  # lmbda 1: every batch sampled
    for name in ("best", "final", "best_policy_model", "final_policy_model"):
        _assert_model_dir(run / "policy" / name)
    state = json.loads((run / "pipeline_state.json").read_text())
    assert json.dumps(state).count("done") >= 2

    # --pretrained_student: the policy stage alone, from a given student, in a fresh run directory
    other = dict(config, output_dir=str(tmp_path / "run2"))
    _run(tmp_path, other, "--stage", "policy", "--pretrained_student", run / "non_policy" / "best_model")
    _assert_model_dir(tmp_path / "run2" / "policy" / "final_policy_model")
    assert not (tmp_path / "run2" / "non_policy").exists()


def test_stage_all_and_test(tmp_path, s2w_config):
    config = s2w_config()
    config["stages"][0]["max_steps"] = 1
    config["stages"][1]["max_steps"] = 1
    config["generation"]["sources"] = ["prompts"]
    config["data"]["sources"]["prompts"]["max_rows"] = 4
    result = _run(tmp_path, config, "--stage", "test")
    assert "non_policy" in result.output or "teacher" in result.output.lower()
    assert not (tmp_path / "run" / "non_policy").exists()  # test trains nothing
    _run(tmp_path, config, "--stage", "all")
    for name in ("non_policy/best_model", "non_policy/final_model", "policy/best_policy_model",
                 "policy/final_policy_model"):
        _assert_model_dir(tmp_path / "run" / name)
