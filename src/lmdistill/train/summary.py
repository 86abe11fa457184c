"""`lmdistill run --stage test`: load models, tokenizers and data, check they fit together, print one screen."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from lmdistill.config import PipelineConfig
from lmdistill.losses.fused import BUDGET_ELEMENTS
from lmdistill.models.load import count_parameters, load_student

# Float32 [tokens, V] blocks alive at the loss's peak on the logits path: the student's logits, the teacher's (or the
# student's log-probs against a cache or hard labels alone) and the gradient the closed form writes (closed_logits.py).
LOGIT_BLOCKS = 3


def _bytes_per_param(model) -> int:
    return next(model.parameters()).element_size()


def activation_floats(config) -> float:
    """Values one decoder layer keeps per token for the backward pass, Llama-style (two RMSNorms, attention through
    scaled_dot_product_attention, a gated MLP): each norm's input and output (4 H), the attention's query, output and
    o_proj input (3 H), its keys and values (2 H_kv), the MLP's gate, activation, up and product (4 I)."""
    hidden = config.hidden_size
    intermediate = (getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                    or getattr(config, "d_ff", None) or 4 * hidden)
    heads = getattr(config, "num_attention_heads", None) or 1
    kv = hidden * (getattr(config, "num_key_value_heads", None) or heads) / heads
    return 7 * hidden + 2 * kv + 4 * intermediate


def _layers(config) -> int:
    return (getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", 0)) + (
        getattr(config, "num_decoder_layers", None) or 0)


def memory_estimate(config: PipelineConfig, teacher, student, vocab: int) -> dict[str, float]:
    """GiB at the peak of a training step (the loss's forward), by part, at the largest configured batch with every
    example max_length long and every position counted. Assumes: weights at their loaded dtype; AdamW's float32
    gradient and two moments per trainable parameter; the student's activations as `activation_floats` per token and
    layer, float32 (2 bytes under bf16 / fp16), or only each layer's input plus one layer's with
    gradient_checkpointing; the loss's float32 blocks, LOGIT_BLOCKS [tokens, V] ones on the logits path (and the
    lm_head's [V, H] gradient beside the embedding's when they are tied), or with
    fused: true a [chunk, V] product per model (the memory budget of losses/fused.py when chunk_size is unset) and the
    lm_head's gradient; the teacher's forward keeping no activations (no gradient). Checked against a measured peak
    by tests/train/test_memory_estimate.py."""
    gib = 1024 ** 3
    batch = max(config.stage_value(s, "batch_size") for s in config.stages)
    tokens = batch * config.data.max_length
    training = config.training
    s_params = count_parameters(student)
    trainable = count_parameters(student, trainable_only=True)
    per_layer = activation_floats(student.config)
    layers = _layers(student.config)
    kept = (layers * student.config.hidden_size + per_layer if training.gradient_checkpointing
            else layers * per_layer)

    def loss_elements(stage) -> int:
        if stage.fused:  # one [chunk, V] product per model, and the lm_head's float32 gradient
            products = 2 * stage.chunk_size * vocab if stage.chunk_size else BUDGET_ELEMENTS
            return products + vocab * student.config.hidden_size
        # Tied embeddings: the lm_head's [V, H] gradient exists beside the embedding's until autograd adds them.
        tied = getattr(student.config, "tie_word_embeddings", False)
        return LOGIT_BLOCKS * tokens * vocab + (vocab * student.config.hidden_size if tied else 0)

    loss = max(loss_elements(s) for s in config.stages)
    estimate = {
        "student weights": s_params * _bytes_per_param(student) / gib,
        "student grads + AdamW state (fp32)": trainable * 4 * 3 / gib,
        "student activations": tokens * kept * (2 if training.bf16 or training.fp16 else 4) / gib,
        "loss logits (fp32)": loss * 4 / gib,
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
