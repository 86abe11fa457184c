"""QLoRA and AdaLoRA students through the whole pipeline: adapters train (across stages too), final/ loads with
AutoModelForCausalLM (merged into a dequantized base, or as a peft adapter folder), and an interrupted stage resumes."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmdistill.config import StudentSettings, config_from_dict
from lmdistill.errors import ModelError
from lmdistill.models.load import apply_lora, load_student
from lmdistill.train.adalora import ADALORA_FILE
from lmdistill.train.pipeline import run_pipeline

KD = [{"name": "forward_kl", "weight": 0.8}, {"name": "cross_entropy", "weight": 0.2}]
CPU = torch.device("cpu")


def _history(stage_dir: Path) -> list[dict]:
    return [h for h in json.loads((stage_dir / "log_history.json").read_text()) if "loss" in h]


def _adapters(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _config(tiny_pipeline, stages, lora, **student):
    data = tiny_pipeline(stages)
    data["student"].update(lora=lora, **student)
    data["data"]["max_length"] = 32
    data["data"]["sources"] = {"domain": data["data"]["sources"]["domain"]}
    data["evaluation"] = {"enabled": False, "report": False}
    return data


def _as_if_killed_after_step_2(run_dir: Path) -> None:
    """Stage `a` of a finished 4-step run back to its state after the step-2 checkpoint: running, later outputs gone."""
    state = json.loads((run_dir / "pipeline_state.json").read_text())
    state["stages"][0]["status"] = "running"
    (run_dir / "pipeline_state.json").write_text(json.dumps(state))
    for gone in ("checkpoint-4", "best", "final", "log_history.json"):
        path = run_dir / "a" / gone
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(run_dir / "final")


@pytest.fixture
def qlora_run(tiny_pipeline):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the `gpu` extra) is not installed")
    stages = [{"name": "a", "max_steps": 4, "save_steps": 2, "losses": KD}]
    data = _config(tiny_pipeline, stages, {"method": "qlora", "r": 4, "alpha": 8},
                   quantization={"bits": 4, "compute_dtype": "float32"})
    # Scored before export: a 4-bit model evaluated on the CPU is the case where bitsandbytes repacks its weights.
    data["evaluation"] = {"enabled": True, "report": False, "num_samples": 0, "max_prompts": 2, "measure_speed": False}
    return data, run_pipeline(config_from_dict(data))


def test_qlora_trains_adapters_on_a_4bit_base_and_exports_them_merged_into_the_dequantized_base(qlora_run,
                                                                                               student_dir):
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    from bitsandbytes.nn import Linear4bit

    data, run_dir = qlora_run
    history = _history(run_dir / "a")
    assert len(history) == 4 and all(torch.isfinite(torch.tensor([h["loss"] for h in history])))
    assert all(h["grad_norm"] > 0 for h in history)
    best = run_dir / "a" / "best"
    adapters = _adapters(best)
    # LoRA starts with B = 0: every B moved away from it, so every adapter took part in training.
    lora_b = {k: v for k, v in adapters.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 7 and all(v.abs().max() > 0 for v in lora_b.values())
    settings = StudentSettings.model_validate(data["student"])
    trained = apply_lora(load_student(settings, "causal", device=CPU, teacher=None, checkpoint=str(best)),
                         settings.lora, "causal").eval()
    assert sum(isinstance(m, Linear4bit) for m in trained.modules()) == 2 * 7  # the base is 4-bit again

    final_dir = run_dir / "final"
    assert "quantization_config" not in json.loads((final_dir / "config.json").read_text())
    final = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    weights = final.state_dict()
    assert not any("lora" in k for k in weights)
    # Reference: the student's weights through an nf4 round trip (what training saw) plus (alpha / r) * B @ A.
    base = AutoModelForCausalLM.from_pretrained(student_dir).state_dict()
    scale = data["student"]["lora"]["alpha"] / data["student"]["lora"]["r"]
    for key, b in lora_b.items():
        module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
        seen = dequantize_4bit(*quantize_4bit(base[f"{module}.weight"], quant_type="nf4"))
        expected = seen + scale * b @ adapters[key.replace("lora_B", "lora_A")]
        torch.testing.assert_close(weights[f"{module}.weight"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with torch.no_grad():  # the exported student is the function that was trained (and evaluated)
        torch.testing.assert_close(final(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_qlora_stage_resumes_from_its_checkpoint_with_the_same_loss_curve(qlora_run):
    data, run_dir = qlora_run
    uninterrupted = [h["loss"] for h in _history(run_dir / "a")]
    _as_if_killed_after_step_2(run_dir)
    run_pipeline(config_from_dict(data))
    resumed = _history(run_dir / "a")
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed] == pytest.approx(uninterrupted, rel=1e-5)
    assert (run_dir / "final" / "config.json").exists()


def test_adalora_adapters_keep_training_in_the_next_stage_and_export_as_a_peft_folder(tiny_pipeline, student_dir):
    from peft import PeftModel

    stages = [{"name": "a", "max_steps": 3, "losses": KD}, {"name": "b", "max_steps": 3, "losses": KD}]
    lora = {"method": "adalora", "r": 2, "alpha": 8, "merge_on_save": False}
    run_dir = run_pipeline(config_from_dict(_config(tiny_pipeline, stages, lora)))
    for stage in ("a", "b"):
        history = _history(run_dir / stage)
        assert len(history) == 3 and all(torch.isfinite(torch.tensor([h["loss"] for h in history])))
        assert all(h["grad_norm"] > 0 for h in history), (stage, history)
    adapter_config = json.loads((run_dir / "a" / "best" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "ADALORA" and adapter_config["total_step"] == 3
    # AdaLoRA's singular values E start at zero: stage a moved them (pruning some ranks away, down to none in a
    # module), stage b, keeping stage a's ranks, moved them again.
    after_a, after_b = ({k: v for k, v in _adapters(run_dir / s / "best").items() if "lora_E" in k} for s in "ab")
    assert after_a and all(v.numel() == 0 or v.abs().max() > 0 for v in after_a.values())
    assert {k: v.shape for k, v in after_a.items()} == {k: v.shape for k, v in after_b.items()}
    assert any(not torch.equal(after_a[k], after_b[k]) for k in after_a)

    final_dir = run_dir / "final"  # merge_on_save: false -> the adapters alone, on top of the student's base
    assert (final_dir / "adapter_config.json").exists() and not (final_dir / "config.json").exists()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    # The allocated ranks differ per module (adapter_config's rank_pattern): peft builds the adapters to match.
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), final_dir).eval()
    plain = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(with_peft(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_qlora_without_a_4bit_base_is_refused(student_dir):
    settings = StudentSettings(name=str(student_dir), lora={"method": "qlora"})
    student = load_student(settings, "causal", device=CPU, teacher=None)
    with pytest.raises(ModelError, match=r"method=qlora .* loaded unquantized: add student.quantization: \{bits: 4\}"):
        apply_lora(student, settings.lora, "causal")


def test_adalora_without_a_step_count_says_to_set_max_steps(student_dir):
    settings = StudentSettings(name=str(student_dir), lora={"method": "adalora"})
    student = load_student(settings, "causal", device=CPU, teacher=None)
    with pytest.raises(ModelError, match=r"method=adalora .*: set max_steps on every stage"):
        apply_lora(student, settings.lora, "causal", total_steps=None)


def test_qlora_gradients_are_the_same_after_an_evaluation(student_dir):
    """bitsandbytes repacks 4-bit weights for its CPU inference kernel at the first eval-mode forward on AVX512-BF16
    machines; training after an evaluation must still get the gradients it got before (apply_lora prevents it)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the `gpu` extra) is not installed")
    settings = StudentSettings(name=str(student_dir), lora={"method": "qlora", "r": 4, "dropout": 0.0},
                               quantization={"bits": 4, "compute_dtype": "float32"})
    ids = torch.tensor([[5, 17, 42, 99, 3, 8, 9]])

    def grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same random A in both models
        model = apply_lora(load_student(settings, "causal", device=CPU, teacher=None), settings.lora, "causal")
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would hide gradients reaching A and the layers below
                torch.nn.init.normal_(param, std=0.05)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, after_eval = grads(False), grads(True)
    assert len(plain) == 2 * 2 * 7
    for name, grad in plain.items():
        torch.testing.assert_close(after_eval[name], grad, msg=name)


def test_adalora_rank_budget_is_allocated_by_the_end_of_the_stage(tiny_pipeline):
    """peft's allocator cuts the budget from 2r to r ranks per module on average; best/ holds the adapters at the
    ranks it kept (rank_pattern), which peft loads."""
    from peft import PeftModel

    stages = [{"name": "a", "max_steps": 4, "save_steps": 2, "losses": KD}]
    data = _config(tiny_pipeline, stages, {"method": "adalora", "r": 2, "merge_on_save": False})
    run_dir = run_pipeline(config_from_dict(data))
    best = run_dir / "a" / "best"
    pattern = json.loads((best / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and all(len(kept) == 4 for kept in pattern.values())  # init_r = 2r
    assert sum(map(sum, pattern.values())) < 4 * len(pattern)  # ranks were pruned ...
    saved = {k.removeprefix("base_model.model."): v for k, v in _adapters(best).items() if "lora_E" in k}
    assert {k: v.shape[0] for k, v in saved.items()} == {k: sum(v) for k, v in pattern.items()}  # the kept ranks
    assert not (best / ADALORA_FILE).exists()  # training state stays in the checkpoints
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(data["student"]["name"]), best)


def test_adalora_stage_resumes_with_its_rank_budget_and_the_same_loss_curve(tiny_pipeline):
    """Killed after the step-2 checkpoint, mid-budget: the resumed stage reloads the full-rank adapters, the rank
    pattern and the allocator's averages, and reproduces the uninterrupted run's losses, ranks and adapters."""
    stages = [{"name": "a", "max_steps": 4, "save_steps": 2, "losses": KD}]
    data = _config(tiny_pipeline, stages, {"method": "adalora", "r": 2, "merge_on_save": False})
    run_dir = run_pipeline(config_from_dict(data))
    uninterrupted = [h["loss"] for h in _history(run_dir / "a")]
    pattern = json.loads((run_dir / "final" / "adapter_config.json").read_text())["rank_pattern"]
    adapters = _adapters(run_dir / "final")
    assert (run_dir / "a" / "checkpoint-2" / ADALORA_FILE).exists()
    _as_if_killed_after_step_2(run_dir)
    run_pipeline(config_from_dict(data))
    resumed = _history(run_dir / "a")
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]
    assert [h["loss"] for h in resumed] == pytest.approx(uninterrupted, rel=1e-5)
    assert json.loads((run_dir / "final" / "adapter_config.json").read_text())["rank_pattern"] == pattern
    for key, value in _adapters(run_dir / "final").items():
        torch.testing.assert_close(value, adapters[key], rtol=1e-5, atol=1e-7, msg=key)


def test_qlora_merge_names_a_base_that_no_longer_loads(tmp_path, student_dir, tokenizer):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the `gpu` extra) is not installed")
    from lmdistill.export import export_student

    moved = tmp_path / "student"
    shutil.copytree(student_dir, moved)
    settings = StudentSettings(name=str(moved), lora={"method": "qlora", "r": 4}, quantization={"bits": 4})
    model = apply_lora(load_student(settings, "causal", device=CPU, teacher=None), settings.lora, "causal")
    shutil.rmtree(moved)
    with pytest.raises(ModelError, match=r"cannot merge the QLoRA adapters: their base model .*student' does not "
                                         r"load .*set student.lora.merge_on_save: false"):
        export_student(model, tokenizer, tmp_path / "final", "{}\n")
    assert not (tmp_path / "final").exists()


def test_adalora_orthogonal_regulariser_joins_training_steps_once_per_optimizer_step(student_dir, tmp_path):
    """peft adds orth_reg_weight x mean ||P^T P - I||_F, ||Q Q^T - I||_F to the loss a model computes itself; the
    distillation loss gets it too, split over the accumulated micro-batches, and evaluation reports the objective."""
    from transformers import TrainingArguments

    from lmdistill.data.collate import DistillCollator
    from lmdistill.losses import DistillObjective, LossTerm
    from lmdistill.train.trainer import DistillationTrainer

    settings = StudentSettings(name=str(student_dir), lora={"method": "adalora", "r": 2, "dropout": 0.0})
    model = apply_lora(load_student(settings, "causal", device=CPU, teacher=None), settings.lora, "causal",
                       total_steps=4)
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to="none", use_cpu=True,
                             remove_unused_columns=False, save_strategy="no")
    trainer = DistillationTrainer(model=model, args=args, data_collator=DistillCollator(0),
                                  objective=DistillObjective([LossTerm("cross_entropy")]))
    ids = [5, 17, 42, 99, 3, 8, 9, 11]
    batch = DistillCollator(0)([{"input_ids": ids, "labels": ids}])
    with torch.no_grad():
        train_loss = trainer.compute_loss(model.train(), batch)
        eval_loss = trainer.compute_loss(model.eval(), batch)
        norms = [torch.linalg.norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(4))
                 for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]
    assert len(norms) == 2 * 2 * 7
    penalty = 0.5 * sum(norms) / len(norms)  # peft's default orth_reg_weight
    assert float(train_loss - eval_loss) == pytest.approx(float(penalty) / 2, rel=1e-4)
