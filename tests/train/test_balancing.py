"""Balancers (loss_scale, gradnorm) act on training steps only: evaluation reports the plain weighted objective, the
balancer's state travels with each checkpoint, and a skipped non-finite step leaves it untouched."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossBalancer, LossTerm
from lmdistill.train.balancing import BALANCER_FILE
from lmdistill.train.trainer import DistillationTrainer

MODES = ["loss_scale", "gradnorm"]


def _rows(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(6, 16, (1,), generator=g))
        ids = torch.randint(5, 300, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "example_id": i})
    return rows


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)


def _objective(cls=DistillObjective):
    return cls([LossTerm("forward_kl", 0.7), LossTerm("cross_entropy", 0.3)], temperature=2.0)


def _trainer(student_dir, teacher, out, balancer, objective=None, steps=4, **kw):
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                             max_steps=steps, learning_rate=0.05, optim="sgd", lr_scheduler_type="constant",
                             report_to="none", use_cpu=True, train_sampling_strategy="sequential",
                             remove_unused_columns=False, logging_steps=1, seed=0, **kw)
    return DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args,
                               train_dataset=_rows(), eval_dataset=_rows(8, seed=1), data_collator=DistillCollator(0),
                               objective=objective or _objective(), teacher=teacher, balancer=balancer)


@pytest.mark.parametrize("mode", MODES)
def test_evaluation_reports_the_plain_weighted_objective(mode, student_dir, teacher, tmp_path):
    """Evaluations during and after training: the run ends, and eval_loss is the unbalanced objective."""
    trainer = _trainer(student_dir, teacher, tmp_path / mode, LossBalancer(mode), eval_strategy="steps",
                       eval_steps=2, save_strategy="no")
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [2, 4]
    state = trainer.balancer.state_dict()
    balanced = trainer.evaluate()["eval_loss"]
    assert trainer.balancer.state_dict() == state  # evaluation neither reads nor moves the balancer
    trainer.balancer = None
    plain = trainer.evaluate()["eval_loss"]
    assert balanced == pytest.approx(plain, rel=1e-6)
    assert abs(plain - 1.0) > 0.1  # not the sum of the weights, as a balanced total would be


def _losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize("mode", MODES)
def test_resume_reproduces_the_uninterrupted_loss_curve(mode, student_dir, teacher, tmp_path):
    whole = _trainer(student_dir, teacher, tmp_path / "whole", LossBalancer(mode), save_strategy="steps",
                     save_steps=2)
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / BALANCER_FILE).exists()
    resumed = _trainer(student_dir, teacher, tmp_path / "resumed", LossBalancer(mode), save_strategy="no")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, got = _losses(whole), _losses(resumed)  # the resumed history starts with the checkpoint's
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    _assert_states_close(resumed.balancer.state_dict(), whole.balancer.state_dict())


def _assert_states_close(a: dict, b: dict) -> None:
    assert a["mode"] == b["mode"]
    for key in ("scales", "multipliers", "initial"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert a[key][name] == pytest.approx(b[key][name], rel=1e-5), (key, name)


class _NaNAtSecondStep(DistillObjective):
    """The real objective, but NaN in every term at the second call (the second step, batch = one micro-batch)."""

    def __call__(self, *a, **kw):
        out = super().__call__(*a, **kw)
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            out.terms = {name: value * float("nan") for name, value in out.terms.items()}
        return out


@pytest.mark.parametrize("mode", MODES)
def test_skipped_nonfinite_step_leaves_the_balancer_untouched(mode, student_dir, teacher, tmp_path):
    trainer = _trainer(student_dir, teacher, tmp_path / mode, LossBalancer(mode), save_strategy="no", steps=3,
                       objective=_objective(_NaNAtSecondStep))
    states = []
    trainer.add_callback(type("Watch", (TrainerCallback,), {
        "on_step_end": lambda self, *a, **k: states.append(trainer.balancer.state_dict())})())
    trainer.train()
    assert len(states) == 3
    assert states[1] == states[0]  # the NaN step: as the first step left it
    assert states[2] != states[1]  # and the next finite step moves it on
    assert all(value == value for state in states for key in ("scales", "multipliers")
               for value in state[key].values())  # no NaN anywhere


def _balancer_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        states = {}
        for mode in MODES:
            torch.manual_seed(0)
            shared = torch.nn.Linear(3, 1)  # the same layer on both processes, as DDP keeps it
            balancer = LossBalancer(mode, lr=0.3)
            for step in range(3):
                x = torch.randn(4, 3, generator=torch.Generator().manual_seed(10 * step + rank))  # local data
                y = shared(x).squeeze(-1)
                terms = {"a": (y - 1).pow(2).mean() * (1 + 3 * rank), "b": y.abs().mean()}

                def average(stats):
                    dist.all_reduce(stats)
                    return stats / world

                balancer.combine(terms, {"a": 1.0, "b": 0.5}, shared.parameters(), average=average)
            states[mode] = balancer.state_dict()
        torch.save(states, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_processes_keep_one_balancer_state(tmp_path):
    """Two processes with different data: each balancer reads the statistics averaged over both, so both hold the
    same state (the one saved with a checkpoint is everyone's)."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "state")
    mp.start_processes(_balancer_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, start_method="fork")
    first, second = (torch.load(f"{out}.{rank}") for rank in (0, 1))
    for mode in MODES:
        _assert_states_close(first[mode], second[mode])
        assert first[mode]["scales" if mode == "loss_scale" else "multipliers"]  # the balancer did act


def test_pipeline_stage_with_gradnorm_evaluates_and_checkpoints_its_state(tiny_pipeline):
    import json

    from lmdistill.config import config_from_dict
    from lmdistill.train.pipeline import run_pipeline

    stage = {"name": "kd", "max_steps": 4, "eval_steps": 2, "save_steps": 2, "balance": "gradnorm",
             "losses": [{"name": "forward_kl", "weight": 0.8}, {"name": "cross_entropy", "weight": 0.2}]}
    run_dir = run_pipeline(config_from_dict(tiny_pipeline([stage], evaluation={"enabled": False})))
    history = json.loads((run_dir / "kd" / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h] == [2, 4]
    checkpoints = sorted((run_dir / "kd").glob("checkpoint-*"))
    assert checkpoints and all((c / BALANCER_FILE).exists() for c in checkpoints)
    assert not (run_dir / "kd" / "best" / BALANCER_FILE).exists()  # training state, not part of the model
