"""Evaluation-driven sampling: a planted weak source gains sampling weight after an evaluation; in a training run the
batches drawn after an evaluation follow the new weights, and a resume from a checkpoint draws the uninterrupted
run's batches."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, TrainerCallback, TrainerState

import lmdistill.train.feedback as feedback
from lmdistill.config import EvalDrivenSettings, config_from_dict
from lmdistill.data.collate import DistillCollator
from lmdistill.data.mixture import MixtureDataset, split_example_id
from lmdistill.train.args import stage_training_arguments
from lmdistill.train.stage import ListDataset, build_objective, build_train_dataset
from lmdistill.train.trainer import DistillationTrainer


def _rows(n, source):
    return [{"input_ids": [5 + i % 7, 6, 7], "labels": [5 + i % 7, 6, 7], "source": source, "row_id": i}
            for i in range(n)]


def test_weak_source_weight_rises(monkeypatch):
    sources = {"easy": _rows(20, "easy"), "weak": _rows(20, "weak"), "other": _rows(20, "other")}
    dataset = MixtureDataset(sources, {"easy": 1.0, "weak": 1.0, "other": 1.0}, None, num_draws=3000, seed=0)
    gaps = {"easy": 0.1, "weak": 0.9, "other": 0.1}
    monkeypatch.setattr(feedback, "agreement_and_kl",
                        lambda teacher, model, examples, batch_size: {"kl_teacher_student": gaps[examples[0]["source"]]})
    callback = feedback.EvalDrivenSampling(dataset, teacher=object(), eval_sets=sources, settings=EvalDrivenSettings())
    before = dataset.probabilities(0.5)["weak"]
    state = SimpleNamespace(global_step=10, is_world_process_zero=True)
    callback.on_evaluate(None, state, None, model=object())
    after = dataset.probabilities(0.5)["weak"]
    assert after > before + 0.1
    drawn = sum(dataset[i]["source"] == "weak" for i in range(3000)) / 3000
    assert abs(drawn - after) < 0.02
    assert min(dataset.probabilities(0.5).values()) > 0  # nothing vanishes


# ------------------------------------------------------------------ stage 3 of the multistage preset, trained
GAPS = {"general": 1.0, "domain": 0.1}  # planted: the student trails the teacher on general text


class _Events(TrainerCallback):
    """Marks each evaluation in the sequence of fetched batches, and can stop the run early (a crash)."""

    def __init__(self, events: list, stop_at: int | None = None):
        self.events, self.stop_at = events, stop_at

    def on_evaluate(self, args, state, control, **kwargs):
        self.events.append(("eval", state.global_step))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.stop_at:
            control.should_training_stop = True


def _preset_stage3(tmp_path):
    from lmdistill.cli import preset_text

    stage = yaml.safe_load(preset_text("multistage"))["stages"][2]
    assert stage["eval_steps"] and stage["eval_driven_sampling"]["enabled"]  # evaluates and feeds back during it
    stage.pop("epochs")
    stage.update(max_steps=8, eval_steps=2, save_steps=4)  # the preset's cadence, scaled to a tiny run
    return config_from_dict({"data": {"sources": {"general": {"path": "general.jsonl"},
                                                  "domain": {"path": "domain.jsonl"}}},
                             "training": {"batch_size": 4, "report_to": [], "logging_steps": 1},
                             "output_dir": str(tmp_path), "stages": [stage]})


def _train(config, student_dir, teacher, out, events, stop_at=None, resume=None):
    """Train the stage; `events` gets ("batch", example ids) per fetched training batch and ("eval", step)."""
    stage = config.stages[0]
    sources = {"general": _rows(24, "general"), "domain": _rows(40, "domain")}
    dataset = build_train_dataset(config, stage, sources)
    collate = DistillCollator(0)

    def collator(items):
        if "example_id" in items[0]:
            events.append(("batch", [item["example_id"] for item in items]))
        return collate(items)

    torch.manual_seed(0)
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir), args=stage_training_arguments(config, stage, out, True),
        train_dataset=dataset, eval_dataset=ListDataset(_rows(4, "domain")), data_collator=collator,
        objective=build_objective(stage), teacher=teacher)
    sampling = feedback.EvalDrivenSampling(dataset, teacher, {n: rows[:4] for n, rows in sources.items()},
                                           stage.eval_driven_sampling)
    trainer.add_callback(sampling)
    trainer.checkpoint_writers.append(sampling.save)  # as the pipeline registers it
    trainer.add_callback(_Events(events, stop_at))
    trainer.train(resume_from_checkpoint=resume)
    return dataset


@pytest.fixture(scope="module")
def stage3_run(tmp_path_factory, student_dir, teacher_dir):
    tmp = tmp_path_factory.mktemp("stage3")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    save, feedback_before_state = TrainerState.save_to_json, []

    def save_state(state, path):  # trainer_state.json marks a checkpoint complete for resume: was the history in?
        feedback_before_state.append((Path(path).parent / feedback.STATE_FILE).exists())
        save(state, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(feedback, "agreement_and_kl",
                      lambda teacher, model, examples, batch_size: {"kl_teacher_student": GAPS[examples[0]["source"]]})
        patch.setattr(TrainerState, "save_to_json", save_state)
        config = _preset_stage3(tmp)
        whole, interrupted, resumed = [], [], []
        dataset = _train(config, student_dir, teacher, tmp / "whole", whole)
        _train(config, student_dir, teacher, tmp / "crash", interrupted, stop_at=6)  # evaluated at 6, saved at 4
        _train(config, student_dir, teacher, tmp / "crash", resumed, resume=str(tmp / "crash" / "checkpoint-4"))
    return dataset, whole, interrupted, resumed, feedback_before_state


def test_preset_stage3_batches_after_an_evaluation_follow_the_new_weights(stage3_run):
    dataset, whole, *_ = stage3_run
    first_eval = whole.index(("eval", 2))
    before = [dataset.names[split_example_id(i)[0]] for kind, ids in whole[:first_eval] if kind == "batch" for i in ids]
    after = [dataset.names[split_example_id(i)[0]] for kind, ids in whole[first_eval:] if kind == "batch" for i in ids]
    assert before.count("general") <= 2  # 10% of 12 draws, as configured
    history = dataset.state_dict()["feedback"]
    assert history[0][0] == len(before)  # the new weights apply from the first draw after the evaluation

    def p_general(draw):  # the preset's 0.9 / 0.1, scaled by the feedback in force at that draw
        m = next(weights for start, weights in reversed(history) if start <= draw)
        return 0.1 * m["general"] / (0.1 * m["general"] + 0.9 * m["domain"])

    expected = sum(p_general(draw) for draw in range(len(before), len(before) + len(after)))
    assert expected > 0.3 * len(after)  # the lagging source gained weight...
    assert abs(after.count("general") - expected) <= 1.5  # ...and the batches drawn after follow it


def test_resume_draws_the_batches_of_the_uninterrupted_run(stage3_run):
    _, whole, interrupted, resumed, _ = stage3_run
    batches = [ids for kind, ids in whole if kind == "batch"]
    assert len(batches) == 8 and ("eval", 6) in interrupted  # the crash came after a later evaluation than saved
    assert [ids for kind, ids in resumed if kind == "batch"] == batches[4:]


def test_the_feedback_history_is_in_each_checkpoint_before_it_counts_as_complete(stage3_run):
    """A run killed right after trainer_state.json is written resumes from that checkpoint: its history must be
    there already (written through the trainer's checkpoint_writers, not in on_save, which comes after)."""
    *_, feedback_before_state = stage3_run
    assert feedback_before_state and all(feedback_before_state)
