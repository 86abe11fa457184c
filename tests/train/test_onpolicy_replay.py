"""The policy stage's replay buffer is saved in every checkpoint (one file per process) and restored on resume."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from lmdistill.config import GenerationSettings, OnPolicySettings
from lmdistill.data.collate import DistillCollator
from lmdistill.errors import TrainingError
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.onpolicy import OnPolicyTrainer, ReplayBuffer, replay_file
from lmdistill.train.stage import ListDataset

SAMPLING = GenerationSettings(temperature=1.0, top_p=0.95, max_new_tokens=5)
QUESTIONS = ["What does the bank report?", "What does a trader say?", "Where is the fund?", "Who runs the market?"]


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval()


@pytest.fixture(scope="module")
def examples(tokenizer) -> list[dict]:
    """Chat prompts (masked) with a short response: 16 rows, 4 steps of batch 4 per epoch."""
    out = []
    for i, question in enumerate(QUESTIONS * 4):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(" It reports.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": p_ids + r_ids, "labels": [-100] * len(p_ids) + r_ids, "example_id": i})
    return out


class Snapshots(TrainerCallback):
    """The trainer's replay buffer at each save (step -> batches) and when training begins (after a resume's loading,
    before the first step)."""

    def __init__(self) -> None:
        self.trainer: OnPolicyTrainer | None = None
        self.at: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.begin: list[dict[str, torch.Tensor]] | None = None

    def _buffer(self) -> list[dict[str, torch.Tensor]]:
        return [dict(batch) for batch in self.trainer.replay.batches]

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = self._buffer()

    def on_save(self, args, state, control, **kwargs):
        self.at[state.global_step] = self._buffer()


def _trainer(out_dir, student_dir, teacher, examples, tokenizer, max_steps: int, replay_size: int = 3,
             callbacks=()) -> OnPolicyTrainer:
    args = TrainingArguments(output_dir=str(out_dir), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             learning_rate=1e-3, lr_scheduler_type="constant", max_steps=max_steps, logging_steps=1,
                             save_strategy="steps", save_steps=2, seed=0)
    trainer = OnPolicyTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args,
                              train_dataset=ListDataset(examples), data_collator=DistillCollator(tokenizer.pad_token_id),
                              processing_class=tokenizer, objective=DistillObjective([LossTerm("reverse_kl")]),
                              teacher=teacher, onpolicy=OnPolicySettings(lmbda=1.0, replay_size=replay_size,
                                                                         replay_ratio=0.5),
                              generation=SAMPLING, seed=0, callbacks=list(callbacks))
    for callback in callbacks:
        callback.trainer = trainer
    return trainer


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def _losses(trainer: OnPolicyTrainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def run(tmp_path_factory, student_dir, teacher, examples, tokenizer):
    """A policy stage trained 6 steps (4 per epoch) with replay, checkpoints every 2 steps: the folder, the buffer
    at each save, and the loss curve."""
    out = tmp_path_factory.mktemp("policy")
    snapshots = Snapshots()
    trainer = _trainer(out, student_dir, teacher, examples, tokenizer, max_steps=6, callbacks=[snapshots])
    trainer.train()
    return out, snapshots.at, _losses(trainer)


def test_checkpoint_holds_the_buffer_and_resume_restores_it(run, student_dir, teacher, examples, tokenizer, tmp_path):
    out, at, _ = run
    assert sorted(at) == [2, 4, 6] and len(at[2]) >= 1 and (out / "checkpoint-2" / replay_file(0)).exists()
    # A new trainer resumed at step 2 (mid-epoch): its buffer is the one saved there before its first step.
    snapshots = Snapshots()
    resumed = _trainer(tmp_path, student_dir, teacher, examples, tokenizer, max_steps=3, callbacks=[snapshots])
    assert len(resumed.replay) == 0
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert _same(snapshots.begin, at[2])


@pytest.mark.parametrize("step", [2, 4])
def test_resumed_run_samples_replays_and_trains_like_the_uninterrupted_one(run, step, student_dir, teacher, examples,
                                                                          tokenizer, tmp_path):
    """Step 2 resumes mid-epoch (Trainer restores the rng state late; the samples must not notice), step 4 at an
    epoch's start."""
    out, at, losses = run
    resumed = _trainer(tmp_path, student_dir, teacher, examples, tokenizer, max_steps=6)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{step}"))
    assert _losses(resumed) == pytest.approx(losses, rel=1e-6)
    assert _same(list(resumed.replay.batches), at[6])


def test_old_checkpoint_without_a_buffer_resumes_empty_with_a_log_line(run, student_dir, teacher, examples, tokenizer,
                                                                       tmp_path, caplog):
    out, _, _ = run
    old = shutil.copytree(out / "checkpoint-2", tmp_path / "checkpoint-2")
    (old / replay_file(0)).unlink()
    snapshots = Snapshots()
    resumed = _trainer(tmp_path / "out", student_dir, teacher, examples, tokenizer, max_steps=3, callbacks=[snapshots])
    with caplog.at_level(logging.WARNING, logger="lmdistill.train.onpolicy"):
        resumed.train(resume_from_checkpoint=str(old))
    assert snapshots.begin == []
    assert f"checkpoint {old} has no replay buffer for process 0" in caplog.text
    assert "resuming with an empty replay buffer" in caplog.text


def test_buffer_file_round_trip_keeps_order_and_capacity(tmp_path, caplog):
    buffer = ReplayBuffer(3)
    for i in range(3):
        buffer.add({"input_ids": torch.full((2, 3 + i), i), "labels": torch.arange(3 + i).repeat(2, 1)})
    buffer.save(str(tmp_path / "b.safetensors"))
    same = ReplayBuffer(3)
    same.load(str(tmp_path / "b.safetensors"))
    assert _same(list(same.batches), list(buffer.batches))
    smaller = ReplayBuffer(2)
    with caplog.at_level(logging.WARNING, logger="lmdistill.train.onpolicy"):
        smaller.load(str(tmp_path / "b.safetensors"))
    assert _same(list(smaller.batches), list(buffer.batches)[1:]) and "keeping the newest 2" in caplog.text
    ReplayBuffer(2).save(str(tmp_path / "empty.safetensors"))
    empty = ReplayBuffer(2)
    empty.load(str(tmp_path / "empty.safetensors"))
    assert len(empty) == 0
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TrainingError, match=r"replay buffer .*bad.safetensors cannot be read .*delete that file to "
                                            "resume with an empty replay buffer"):
        empty.load(str(tmp_path / "bad.safetensors"))


def test_each_process_saves_and_restores_its_own_buffer(student_dir, teacher, examples, tokenizer, tmp_path,
                                                        monkeypatch):
    """Two processes (process_index 0 and 1, as under torchrun) with different buffers share one checkpoint folder."""
    rank = {"index": 0}
    monkeypatch.setattr(TrainingArguments, "process_index", property(lambda self: rank["index"]))
    checkpoint = tmp_path / "checkpoint-2"
    saved = {}
    for index in (0, 1):
        rank["index"] = index
        trainer = _trainer(tmp_path, student_dir, teacher, examples, tokenizer, max_steps=1)
        for i in range(index + 1):
            trainer.replay.add({"input_ids": torch.full((1, 4), 10 * index + i), "labels": torch.zeros(1, 4)})
        trainer._save_rng_state(str(checkpoint))  # Trainer's per-process save hook
        saved[index] = list(trainer.replay.batches)
    assert (checkpoint / replay_file(0)).exists() and (checkpoint / replay_file(1)).exists()
    for index in (1, 0):
        rank["index"] = index
        trainer = _trainer(tmp_path, student_dir, teacher, examples, tokenizer, max_steps=1)
        trainer._load_optimizer_and_scheduler(str(checkpoint))  # Trainer's per-process hook before the first step
        assert _same(list(trainer.replay.batches), saved[index])
