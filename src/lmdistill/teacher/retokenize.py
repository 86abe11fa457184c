"""Teacher and student with different tokenizers: what needs one vocabulary, and sequence-level KD across two.

    needs_shared_vocab(config)    what in the config compares token ids one by one (None: nothing does)
    teacher_sources(...)          the training sources rendered with the teacher's chat template and tokenised by the
                                  teacher's tokenizer; each example keeps its conversation without the answer
                                  (`messages`), so a teacher generation can be rendered again for the student
    student_examples(...)         generations written with another tokenizer: conversation plus the teacher's answer
                                  text, rendered with the student's template and tokenised by the student's tokenizer
"""

from __future__ import annotations

from lmdistill.config import PipelineConfig
from lmdistill.data.formats import load_source
from lmdistill.data.render import to_messages
from lmdistill.data.tokenize import encode_rows

# Losses that never compare the two models' token ids: the student's own CE, and the cross-vocabulary ones.
ACROSS_VOCABULARIES = ("cross_entropy", "uld", "cross_vocab_kl")


def needs_shared_vocab(config: PipelineConfig) -> str | None:
    """The first part of the config that needs teacher and student to share their vocabulary, in words."""
    if config.student.from_teacher is not None:
        return "a student built from the teacher's layers (student.from_teacher)"
    for stage in config.stages:
        if stage.kind == "finetune":
            continue
        if stage.kind == "policy":
            return f"stage {stage.name!r} (kind: policy: the teacher scores the student's own token ids)"
        if stage.eval_driven_sampling is not None and stage.eval_driven_sampling.enabled:
            return f"stage {stage.name!r}'s eval_driven_sampling (the teacher scores the student's eval tokens)"
        for term in stage.losses:
            if term.name not in ACROSS_VOCABULARIES:
                return f"stage {stage.name!r}'s loss {term.name}"
    return None


def teacher_sources(config: PipelineConfig, tokenizer, task_type: str, names: list[str],
                    group: str = "sources") -> dict[str, list[dict]]:
    """The sources `names` of data.sources (group="eval": of data.eval) as the teacher reads them (see the module
    docstring), each example also keeping its `answer` text; plain text rows have no conversation and are left
    out. One example per row: the teacher writes (and is scored on) the last answer."""
    sources = {}
    for name in names:
        settings = getattr(config.data, group)[name]
        max_rows = settings.max_rows or (config.data.eval_max_rows if group == "eval" else None)
        rows = load_source(settings.path, format=settings.format, split=settings.split, max_rows=max_rows,
                           strict=config.data.strict, columns=settings.columns).rows
        chats = {row["row_id"]: to_messages(row) for row in rows if "text" not in row}
        encoded = encode_rows([row for row in rows if "text" not in row], tokenizer,
                              max_length=config.data.max_length, task_type=task_type, strict=config.data.strict,
                              source_name=name, train_on="last_assistant").examples if chats else []
        sources[name] = [{**ex, "messages": chats[ex["row_id"]][:-1], "answer": chats[ex["row_id"]][-1]["content"]}
                         for ex in encoded]
    return sources


def student_examples(lines: list[tuple[int, dict]], tokenizer, max_length: int, task_type: str) -> list[dict]:
    """Training examples for the student from (line number, generation) pairs written with another tokenizer: the
    teacher's answer is the assistant turn, trained on as any response is (eos after it, so the student learns to
    stop); row_id is the line number - 1, as for generations read by their ids."""
    rows = [{"messages": line["messages"] + [{"role": "assistant", "content": line["completion"]}],
             "row_id": number - 1, "bucket": line["source"]} for number, line in lines]
    if not rows:
        return []
    return encode_rows(rows, tokenizer, max_length=max_length, task_type=task_type,
                       source_name="generations").examples
