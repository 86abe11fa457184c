"""final/: loads with AutoModelForCausalLM and generates; LoRA merged (or kept); push fails clearly offline."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.errors import LmdistillError, ModelError
from lmdistill.export import export_student, push_to_hub

CONFIG_YAML = "seed: 7\nstages:\n  - name: stage1\n    temperature: 2.0\n"
CARD = {"teacher": "tiny-teacher-4x128", "student": "tiny-student-2x64", "data": ["general.jsonl", "domain.jsonl"],
        "stages": [{"name": "stage1", "losses": "forward_kl", "steps": 10}],
        "metrics": {"teacher": {"rouge_l": 0.5}, "student_after": {"rouge_l": 0.4321, "params": 150000}}}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_export_loads_with_auto_class_and_generates(student, tokenizer, tmp_path):
    out = export_student(student, tokenizer, tmp_path / "final", CONFIG_YAML, CARD)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "lmdistill_config.yaml",
            "README.md"} <= {p.name for p in out.iterdir()}
    assert (out / "lmdistill_config.yaml").read_text() == CONFIG_YAML
    card = (out / "README.md").read_text()
    for text in ("tiny-teacher-4x128", "domain.jsonl", "| stage1 | forward_kl | 10 |", "| rouge_l | 0.5 | 0.4321 |",
                 "| params |  | 150,000 |", "AutoModelForCausalLM"):
        assert text in card
    loaded = AutoModelForCausalLM.from_pretrained(out)
    loaded_tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([loaded_tok("What does the bank report?")["input_ids"]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(student, ids))
    generated = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids.shape[1]
    assert loaded.generation_config.pad_token_id == 0 and loaded.generation_config.eos_token_id == 1


def test_reexport_replaces_the_folder_and_leaves_no_temp_dirs(student, tokenizer, tmp_path):
    export_student(student, tokenizer, tmp_path / "final", "seed: 1\n")
    (tmp_path / "final" / "stale.txt").write_text("from the first export")
    export_student(student, tokenizer, tmp_path / "final", "seed: 2\n")
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert not (tmp_path / "final" / "stale.txt").exists()
    assert (tmp_path / "final" / "lmdistill_config.yaml").read_text() == "seed: 2\n"


@pytest.fixture()
def lora_student(student_dir):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(student_dir)
    # init_lora_weights=False: random adapters, so a merge that did nothing would change the logits.
    return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_lora_is_merged_by_default_and_the_adapter_model_is_untouched(lora_student, tokenizer, tmp_path):
    ids = torch.tensor([tokenizer("Cash flow with care.")["input_ids"]])
    before = _logits(lora_student, ids)
    out = export_student(lora_student, tokenizer, tmp_path / "final", CONFIG_YAML, CARD)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), before, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_logits(lora_student, ids), before)  # still the adapter model


def test_lora_kept_as_adapters_when_asked(lora_student, tokenizer, tmp_path):
    ids = torch.tensor([tokenizer("Cash flow with care.")["input_ids"]])
    out = export_student(lora_student, tokenizer, tmp_path / "final", CONFIG_YAML, CARD, merge_lora=False)
    assert (out / "adapter_config.json").exists() and (out / "generation_config.json").exists()
    assert "library_name: peft" in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # transformers resolves the base model through peft
    torch.testing.assert_close(_logits(reloaded, ids), _logits(lora_student, ids), rtol=1e-4, atol=1e-5)


def test_push_offline_fails_in_one_line(student, tokenizer, tmp_path, monkeypatch):
    export_student(student, tokenizer, tmp_path / "final", CONFIG_YAML)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmdistillError, match="offline mode is on") as err:
        push_to_hub(tmp_path, "someone/tiny-student")
    assert "\n" not in str(err.value) and str(tmp_path / "final") in str(err.value)


def test_push_without_connection_fails_in_one_line(student, tokenizer, tmp_path, monkeypatch):
    from huggingface_hub import constants

    export_student(student, tokenizer, tmp_path / "final", CONFIG_YAML)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(LmdistillError, match="no connection to the Hub") as err:
        push_to_hub(tmp_path, "someone/tiny-student", token="hf_test", endpoint="http://127.0.0.1:9")
    assert "\n" not in str(err.value)


def test_push_needs_an_exported_model(tmp_path):
    with pytest.raises(ModelError, match="no exported model in .*final: finish `lmdistill run`"):
        push_to_hub(tmp_path, "someone/tiny-student")


def test_push_with_a_refused_token_says_how_to_log_in(student, tokenizer, tmp_path, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from huggingface_hub import constants

    class Unauthorized(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = b'{"error": "Invalid credentials"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    export_student(student, tokenizer, tmp_path / "final", CONFIG_YAML)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(LmdistillError, match="the Hub answered HTTP 401; log in with `hf auth login`") as err:
            push_to_hub(tmp_path, "someone/tiny-student", token="hf_bad",
                        endpoint=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert "\n" not in str(err.value)
