"""Resume after a real SIGKILL: `lmdistill run` killed (its whole process group, no handler runs) the moment its
first checkpoint is complete, then run again, ends with the student weights of the uninterrupted run, and with the
same EMA teacher in self-distillation.

Equality is torch.equal: the steps after the checkpoint repeat the same float operations on the same inputs in the
same order, so any difference means some state (initial adapters, batches, sampling weights, rng, optimizer, EMA)
was not restored. Every run is its own `lmdistill run` process: the uninterrupted one too, since the same steps run
in the test process can differ from a fresh process in the last bits (a fresh process is what a resume is). The
processes are forked from a forkserver that has imported lmdistill's training stack and run nothing, so each starts
fresh without paying the imports again (most of a tiny run's time); each is its own process group."""

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from lmdistill.train.ema import EMA_FILE
from lmdistill.train.pipeline import last_checkpoint

KD = [{"name": "forward_kl", "weight": 0.8}, {"name": "cross_entropy", "weight": 0.2}]


# The stack `lmdistill run` imports, loaded once; every run is a fork of this server (state: imports only).
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["lmdistill.cli", "lmdistill.train.pipeline"])


def _cli_run(config: str, log: str) -> None:
    """In the forked child: `lmdistill run CONFIG` as its own process group (killpg reaches it all), stderr to log."""
    os.setsid()
    with open(log, "wb") as err, open(os.devnull, "wb") as out:
        os.dup2(err.fileno(), 2)
        os.dup2(out.fileno(), 1)
    sys.argv = ["lmdistill", "run", config]
    from lmdistill.cli import main

    main()


def _start(data: dict, out: Path) -> multiprocessing.Process:
    """`lmdistill run` on `data` into `out`, in its own process group."""
    config = out.with_suffix(".yaml")
    config.write_text(yaml.safe_dump({**data, "output_dir": str(out)}))
    proc = _FORKS.Process(target=_cli_run, args=(str(config), str(out.with_suffix(".log"))))
    proc.start()
    return proc


def _log(out: Path) -> str:
    """What the run wrote to stderr (its log, or its error)."""
    return out.with_suffix(".log").read_text()


def _finish(proc: multiprocessing.Process, out: Path) -> None:
    proc.join(timeout=300)
    assert proc.exitcode == 0, _log(out)[-3000:]


def _kill_at_first_checkpoint(proc: multiprocessing.Process, out: Path, stage: str) -> None:
    """SIGKILL the run once a checkpoint of `stage` is complete (Trainer writes trainer_state.json last; whole)."""
    deadline = time.time() + 120
    while last_checkpoint(out / stage) is None:
        assert proc.is_alive(), _log(out)[-3000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    state = json.loads((out / "pipeline_state.json").read_text())
    assert state["stages"][-1]["status"] == "running"  # killed mid-stage, not after it


def _whole_and_resumed(data: dict, tmp_path: Path, stage: str) -> tuple[Path, Path]:
    """(the uninterrupted run, the run killed at its first checkpoint and run again); the first two side by side."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    uninterrupted = _start(data, whole)
    _kill_at_first_checkpoint(_start(data, cut), cut, stage)
    resumed = _start(data, cut)
    _finish(uninterrupted, whole)
    _finish(resumed, cut)
    assert f"stage {stage}: resuming from" in _log(cut)  # continued from the checkpoint, not restarted
    return whole, cut


def _small(data: dict) -> dict:
    for source in data["data"]["sources"].values():
        source["max_rows"] = 24
    return data


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = {name: (a[name] - b[name]).abs().max().item() for name in a if not torch.equal(a[name], b[name])}
    assert not differ, differ


def _student(run_dir: Path) -> dict[str, torch.Tensor]:
    """The run's exported student (adapters merged)."""
    return load_file(run_dir / "final" / "model.safetensors")


def test_kd_with_a_scheduled_mixture_and_evaluation_driven_sampling(tiny_pipeline, tmp_path):
    """The mixture's draws by schedule and by the sampling weights fed back at each evaluation (the feedback file)."""
    stage = {"name": "s", "max_steps": 4, "save_steps": 2, "eval_steps": 2, "losses": KD,
             "eval_driven_sampling": {"enabled": True},
             "mixture": {"weights": {"general": 1.0},
                         "schedule": {"kind": "linear", "source": "domain", "start": 0.8, "end": 0.3}}}
    data = _small(tiny_pipeline([stage], evaluation={"enabled": False, "report": False}))
    # evaluation-driven sampling compares eval sets named like the sources
    data["data"]["eval"] = {name: {"path": data["data"]["sources"][name]["path"], "max_rows": 8}
                            for name in ("general", "domain")}
    whole, resumed = _whole_and_resumed(data, tmp_path, "s")
    _same(_student(resumed), _student(whole))


def test_ema_self_distillation_with_lora_after_sigkill(tiny_pipeline, tmp_path):
    """The EMA teacher (written before the checkpoint counts as complete), LoRA adapters new in the run (their
    initial values), LoRA dropout (the rng) and micro-batches of a step."""
    stage = {"name": "self", "max_steps": 4, "save_steps": 2, "gradient_accumulation_steps": 2, "losses": KD,
             "teacher": {"self": "ema", "decay": 0.5}}
    data = _small(tiny_pipeline([stage], evaluation={"enabled": False, "report": False}))
    del data["teacher"]  # self-distillation needs no other model
    data["student"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1}
    whole, resumed = _whole_and_resumed(data, tmp_path, "self")
    ema = [load_file(run / "self" / "checkpoint-4" / EMA_FILE) for run in (resumed, whole)]
    _same(*ema)
    _same(_student(resumed), _student(whole))


def test_a_checkpoint_whose_trainer_state_a_kill_cut_short_is_passed_over(tmp_path):
    """Trainer writes trainer_state.json last but not atomically: killed while writing it, the newest checkpoint
    holds a file cut short, and the run resumes from the one before (it failed to parse the file)."""
    state = json.dumps({"global_step": 2, "log_history": []}, indent=2)
    for step, text in ((2, state), (4, state[:len(state) // 2]), (6, "")):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(text)
    (tmp_path / "checkpoint-8").mkdir()  # killed before its trainer state
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
