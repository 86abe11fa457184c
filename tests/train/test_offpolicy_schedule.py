"""DistiLLM's adaptive off-policy schedule: the student-sample share rises after an evaluation that did not improve
on the best validation loss, and stays where it is after one that did."""

from __future__ import annotations

import re

import pytest
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from lmdistill.config import AdaptiveOffPolicySettings, GenerationSettings, OnPolicySettings, config_from_dict
from lmdistill.data.collate import DistillCollator
from lmdistill.errors import ConfigError
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.offpolicy_schedule import student_share
from lmdistill.train.onpolicy import OnPolicyTrainer
from lmdistill.train.stage import ListDataset

ADAPTIVE = AdaptiveOffPolicySettings(start=0.0, step=0.25, max=0.5)


class Shares(TrainerCallback):
    """(eval_loss, trainer.lmbda) after each evaluation; added after the trainer (and so the schedule's own callback)
    is built, so it sees the share the schedule just set."""

    def __init__(self) -> None:
        self.trainer: OnPolicyTrainer | None = None
        self.seen: list[tuple[float, float]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append((metrics["eval_loss"], self.trainer.lmbda))


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict]:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does the bank report?"}],
                                           add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(" It reports.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [{"input_ids": p_ids + r_ids, "labels": [-100] * len(p_ids) + r_ids} for _ in range(4)]


def _train(tmp_path, student_dir, teacher_dir, tokenizer, examples, learning_rate: float) -> list[tuple[float, float]]:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             learning_rate=learning_rate, lr_scheduler_type="constant", max_steps=4, logging_steps=1,
                             eval_strategy="steps", eval_steps=1, save_strategy="no", seed=0)
    shares = Shares()
    trainer = OnPolicyTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir), args=args, train_dataset=ListDataset(examples),
        eval_dataset=ListDataset(examples), data_collator=DistillCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, objective=DistillObjective([LossTerm("reverse_kl")]),
        teacher=AutoModelForCausalLM.from_pretrained(teacher_dir).eval(),
        onpolicy=OnPolicySettings(replay_size=2, adaptive=ADAPTIVE),
        generation=GenerationSettings(max_new_tokens=4), seed=0)
    shares.trainer = trainer
    trainer.add_callback(shares)
    assert trainer.lmbda == 0.0
    trainer.train()
    return shares.seen


def test_share_rises_after_each_evaluation_that_did_not_improve(tmp_path, student_dir, teacher_dir, tokenizer,
                                                                examples):
    # A learning rate of 0 leaves every evaluation at the first one's loss: none after it improves.
    seen = _train(tmp_path, student_dir, teacher_dir, tokenizer, examples, learning_rate=0.0)
    assert [share for _, share in seen] == [0.0, 0.25, 0.5, 0.5]  # capped at max


def test_share_stays_while_validation_loss_falls(tmp_path, student_dir, teacher_dir, tokenizer, examples):
    seen = _train(tmp_path, student_dir, teacher_dir, tokenizer, examples, learning_rate=1e-3)
    losses = [loss for loss, _ in seen]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert [share for _, share in seen] == [0.0] * 4


def test_share_against_a_plain_reference():
    settings = AdaptiveOffPolicySettings(start=0.1, step=0.2, max=0.6, min_delta=0.05)
    losses = [3.0, 2.0, 1.98, 2.5, 1.0, 1.0, 0.5, 0.9, 0.8]
    share, best = 0.1, float("inf")
    for loss in losses:
        if loss < best - 0.05:
            best = loss
        else:
            share = min(0.6, share + 0.2)
    assert student_share(losses, settings) == pytest.approx(share)


def _stage(**onpolicy) -> dict:
    return {"name": "gkd", "kind": "policy", "eval_steps": 2, "max_steps": 4, "losses": [{"name": "reverse_kl"}],
            "onpolicy": onpolicy}


@pytest.mark.parametrize(("stage", "data_eval", "message"), [
    (_stage(adaptive={"start": 0.8, "max": 0.5}), True, "adaptive.start (0.8) is above adaptive.max (0.5)"),
    (_stage(adaptive={"rate": 0.1}), True, "rate"),
    ({**_stage(adaptive={}), "eval_steps": None}, True, "needs kind: policy and eval_steps on the stage"),
    ({**_stage(adaptive={}), "kind": "distill"}, True, "needs kind: policy and eval_steps on the stage"),
    (_stage(adaptive={}), False, "data.eval is empty; give data.eval a held-out set"),
])
def test_bad_adaptive_settings_fail_at_load(stage, data_eval, message):
    data = {"sources": {"qa": {"path": "qa.jsonl"}}}
    if data_eval:
        data["eval"] = {"qa": {"path": "qa.jsonl"}}
    config = {"teacher": {"name": "t"}, "student": {"name": "s"}, "data": data, "stages": [stage]}
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(config, "test")
