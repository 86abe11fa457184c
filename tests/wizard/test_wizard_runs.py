"""The wizard's QLoRA and AdaLoRA answers, written to a config and then run from that file (a few steps)."""

import io
import json

import pytest
import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM

from lmdistill.wizard import run_wizard


def _answers(tmp_path, model_dir, data, method: str) -> dict:
    """Fine-tuning answers for the tiny fixture model: 24 rows, 2 held out, batch 4, 1 epoch, short sequences."""
    return {"approach": "1", "method": method, "model": str(model_dir), "dataset": str(data), "samples": "24",
            "eval_data": "holdout", "eval_rows": "2", "epochs": "1", "batch_size": "4", "learning_rate": "1e-3",
            "advanced": "y", "max_length": "32", "max_new_tokens": "4", "speed": "n",
            "output_dir": str(tmp_path / "run"), "config": str(tmp_path / "run.yaml"), "start": "y"}


def _trained(run_dir, changed: str) -> int:
    """Steps trained (the loss finite); the adapter weights named `changed` (zero at init) all moved (AdaLoRA may
    have pruned a module's ranks to none: an empty tensor)."""
    from safetensors.torch import load_file

    summary = json.loads((run_dir / "finetune" / "log_history.json").read_text())[-1]
    assert torch.isfinite(torch.tensor(summary["train_loss"])), summary
    adapters = load_file(run_dir / "finetune" / "best" / "adapter_model.safetensors")
    moved = [v.abs().max() > 0 for k, v in adapters.items() if changed in k and v.numel()]
    assert moved and all(moved)
    return summary["step"]


def test_qlora_answers_write_a_config_that_trains_and_exports(tmp_path, student_dir, qa_jsonl):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the `gpu` extra) is not installed")
    console = Console(file=io.StringIO(), width=200)
    run_dir = run_wizard(console, yes=True, defaults=_answers(tmp_path, student_dir, qa_jsonl, "2"))
    config = yaml.safe_load((tmp_path / "run.yaml").read_text())
    assert config["student"]["lora"] == {"method": "qlora"} and config["student"]["quantization"] == {"bits": 4}
    assert run_dir == tmp_path / "run"
    assert _trained(run_dir, "lora_B") == 6  # 22 training rows, batch 4, 1 epoch
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")  # merged at full precision, no 4-bit config
    assert not hasattr(final.config, "quantization_config") and not any("lora" in k for k in final.state_dict())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["student_after"]["rouge_l"] <= 1.0


def test_adalora_answers_write_a_config_that_trains_its_step_budget(tmp_path, student_dir, qa_jsonl):
    console = Console(file=io.StringIO(), width=200)
    run_dir = run_wizard(console, yes=True, defaults=_answers(tmp_path, student_dir, qa_jsonl, "3"))
    stage = yaml.safe_load((tmp_path / "run.yaml").read_text())["stages"][0]
    assert stage["max_steps"] == 6
    assert _trained(run_dir, "lora_E") == 6
    adapter_config = json.loads((run_dir / "finetune" / "best" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "ADALORA" and adapter_config["total_step"] == 6
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert not any("lora" in k for k in final.state_dict())
