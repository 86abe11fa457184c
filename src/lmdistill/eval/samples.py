"""Quality-check samples (seeds 000/001): the same prompts answered by teacher and student side by side, during
training (every evaluation, through `SamplesCallback`) and at the end. Each record goes to RUN_DIR/samples.jsonl
(with stage and step), to the log, and to TensorBoard as text when a log folder is given."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback

from lmdistill.eval.metrics import generate_continuations
from lmdistill.models.sharding import is_sharded, release_gathered

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


def _prompt_text(tokenizer, prompt: str | Sequence[int]) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(list(prompt), skip_special_tokens=False)


def side_by_side(teacher_outputs: Sequence[str], student: torch.nn.Module, tokenizer,
                 prompts: Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 64,
                 batch_size: int = 8) -> list[dict[str, str]]:
    """Generate the student's greedy answers and pair them with the teacher's answers to the same prompts.

    The teacher's answers are an argument because the teacher is frozen: greedy answers computed once (with
    `generate_continuations`) stay valid for every evaluation of a run.
    Returns [{"prompt", "teacher", "student"}] in prompt order.
    """
    student_outputs = generate_continuations(student, tokenizer, prompts, max_new_tokens, batch_size)
    return [{"prompt": _prompt_text(tokenizer, p), "teacher": t, "student": s}
            for p, t, s in zip(prompts, teacher_outputs, student_outputs)]


def _markdown_table(records: Sequence[dict[str, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    rows = [f"| {cell(r['prompt'])} | {cell(r['teacher'])} | {cell(r['student'])} |" for r in records]
    return "\n".join(["| prompt | teacher | student |", "|---|---|---|", *rows])


def write_samples(run_dir: str | Path, records: Sequence[dict[str, str]], stage: str, step: int,
                  tb_writer=None) -> Path:
    """Append `records` (from `side_by_side`) to RUN_DIR/samples.jsonl with their stage and step, log them, and
    add them as a markdown table to TensorBoard (tag samples/<stage>) when `tb_writer` (a SummaryWriter) is set."""
    path = Path(run_dir) / SAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps({"stage": stage, "step": step, **record}, ensure_ascii=False) + "\n")
    for record in records:
        logger.info("sample [%s step %d]\n  prompt : %s\n  teacher: %s\n  student: %s", stage, step,
                    record["prompt"], record["teacher"], record["student"])
    if tb_writer is not None:
        tb_writer.add_text(f"samples/{stage}", _markdown_table(records), global_step=step)
        tb_writer.flush()
    return path


def read_samples(run_dir: str | Path) -> list[dict]:
    """All records of RUN_DIR/samples.jsonl ([] when absent). A last line cut short by a killed run is skipped
    with a warning rather than failing the report."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping unreadable line %d of %s", number, path)
    return records


class SamplesCallback(TrainerCallback):
    """At every evaluation, answer `prompts` with the model being trained and with the teacher, side by side,
    into RUN_DIR/samples.jsonl, the log and (with `tensorboard_dir`) TensorBoard; `modes` (one per prompt: "answer",
    or "continuation" of a held-out text prefix) are recorded with them. Runs on the main process only,
    or on every process when the teacher or the student is sharded over them (their generation is collective).
    """

    def __init__(self, teacher: torch.nn.Module, tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]],
                 run_dir: str | Path, stage: str, max_new_tokens: int = 64, batch_size: int = 8,
                 tensorboard_dir: str | Path | None = None, modes: Sequence[str] | None = None) -> None:
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.modes = list(modes) if modes is not None else None
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.tensorboard_dir = tensorboard_dir
        self._teacher_outputs: list[str] | None = None
        self._writer = None

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if model is None or not self.prompts:
            return
        if not (state.is_world_process_zero or is_sharded(self.teacher) or is_sharded(model)):
            return
        if self._teacher_outputs is None:
            self._teacher_outputs = generate_continuations(self.teacher, self.tokenizer, self.prompts,
                                                           self.max_new_tokens, self.batch_size)
            release_gathered(self.teacher)  # a sharded teacher back to its shards before training goes on
        records = side_by_side(self._teacher_outputs, model, self.tokenizer, self.prompts, self.max_new_tokens,
                               self.batch_size)
        if self.modes is not None:
            records = [{**record, "mode": mode} for record, mode in zip(records, self.modes)]
        if not state.is_world_process_zero:
            return
        if self._writer is None and self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir))
        write_samples(self.run_dir, records, self.stage, state.global_step, self._writer)

    def on_train_end(self, args, state, control, **kwargs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
