"""`lmdistill run --stage test`: load models, tokenizers and data, check they fit together, print one screen."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lmdistill.config import PipelineConfig
from lmdistill.models.load import count_parameters, load_student

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _bytes_per_param(model) -> int:
    return next(model.parameters()).element_size()


def memory_estimate(config: PipelineConfig, teacher, student, vocab: int) -> dict[str, float]:
    """Rough GiB per training step at the largest configured batch and length: weights, AdamW state, logits."""
    gib = 1024 ** 3
    batch = max(config.stage_value(s, "batch_size") for s in config.stages)
    tokens = batch * config.data.max_length
    chunk = min([s.chunk_size for s in config.stages if s.chunk_size] or [tokens])
    fused = any(s.fused for s in config.stages)
    s_params = count_parameters(student)
    trainable = count_parameters(student, trainable_only=True)
    estimate = {
        "student weights": s_params * _bytes_per_param(student) / gib,
        "student grads + AdamW state (fp32)": trainable * 4 * 3 / gib,
        # float32 logits of both models (+ their gradient for the student) over the tokens one chunk holds
        "loss logits (fp32, per chunk)": (3 if teacher is not None else 2) * min(chunk, tokens) * vocab * 4 / gib
        if not fused else 3 * min(chunk, 1024) * vocab * 4 / gib,
    }
    if teacher is not None:
        estimate["teacher weights"] = count_parameters(teacher) * _bytes_per_param(teacher) / gib
    return estimate


def print_summary(config: PipelineConfig, console: Console) -> None:
    from lmdistill.train.prepare import prepare

    served = bool(config.teacher.endpoint)
    prep = prepare(config, load_teacher=not served)
    if served:  # the teacher stays on its server: checked to answer and to serve teacher.name, never loaded here
        from lmdistill.train.served import served_teacher

        prep = served_teacher(config, prep)
    t = None if served else prep.teacher
    student = load_student(config.student, prep.task_type, device=prep.device, teacher=t)
    vocab = prep.shared_vocab or len(prep.tokenizer)
    table = Table(title=f"lmdistill --stage test: {len(config.stages)} stage(s), task {prep.task_type}")
    for col in ("", "teacher", "student"):
        table.add_column(col)
    table.add_row("model", config.teacher.name or "-", config.student.name or f"from teacher {config.student.from_teacher}")
    if served:
        table.add_row("served by", f"{prep.teacher.url} ({prep.teacher.served_model})", "-")
    table.add_row("parameters", f"{count_parameters(t):,}" if t is not None else "-", f"{count_parameters(student):,}")
    table.add_row("dtype", str(next(t.parameters()).dtype) if t is not None else "-", str(next(student.parameters()).dtype))
    table.add_row("device", str(next(t.parameters()).device) if t is not None else "-", str(prep.device))
    table.add_row("vocab (shared)", str(vocab), str(len(prep.tokenizer)))
    console.print(table)
    data = Table(title="data")
    for col in ("source", "format", "rows", "kept", "skipped", "held out for eval"):
        data.add_column(col)
    for name, rep in prep.data_report.items():
        data.add_row(name, rep["format"], str(rep["rows"]), str(rep["kept"]), str(rep["skipped"] or "-"),
                     str(rep.get("held_out", "-")))
    console.print(data)
    mem = Table(title=f"estimated memory per step (batch x max_length = "
                      f"{max(config.stage_value(s, 'batch_size') for s in config.stages)} x {config.data.max_length})")
    mem.add_column("part")
    mem.add_column("GiB", justify="right")
    estimate = memory_estimate(config, t, student, vocab)
    for part, value in estimate.items():
        mem.add_row(part, f"{value:.3f}")
    mem.add_row("total", f"{sum(estimate.values()):.3f}")
    console.print(mem)
    stages = ", ".join(f"{s.name} ({s.kind}, T={s.temperature}, {[t.name for t in s.losses]})" for s in config.stages)
    console.print(f"stages: {stages}")
    console.print("[green]ok[/]: models, tokenizers and data load and fit together")
