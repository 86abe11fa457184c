"""A run whose teacher is served (teacher.endpoint): the prepared run gets an EndpointTeacher where it would load
the model (`cache-teacher`, `generate`: `prep.teacher`; `run`: `prep.served`, which the stages ask through
teacher/served_scoring.py). The teacher's tokenizer and config still load from teacher.name, for prompts and the
vocabulary check."""

from __future__ import annotations

import dataclasses
import logging

from lmdistill.config import (AttentionTerm, ContrastiveTerm, CrossVocabTerm, FeatureTerm, LogitTerm, PipelineConfig,
                              StageSettings)
from lmdistill.errors import ConfigError
from lmdistill.models.load import load_tokenizer
from lmdistill.models.vocab import check_same_vocab, same_vocab
from lmdistill.teacher.endpoint import open_teacher
from lmdistill.teacher.retokenize import needs_shared_vocab
from lmdistill.teacher.served_scoring import served_losses_check

log = logging.getLogger(__name__)


def served_teacher(config: PipelineConfig, prep, vocab_check: bool = True):
    """`prep` (prepared without a teacher) with the teacher on config.teacher.endpoint, checked to serve the
    teacher config.teacher.name names before any work."""
    from transformers import AutoConfig

    if prep.task_type != "causal":
        raise ConfigError(f"teacher.endpoint serves causal language models; this run's task_type is "
                          f"{prep.task_type}: remove teacher.endpoint to run the teacher in-process")
    trust = config.teacher.trust_remote_code
    teacher_config = AutoConfig.from_pretrained(config.teacher.name, trust_remote_code=trust)
    teacher_tokenizer = load_tokenizer(config.teacher.name, trust)
    rows = teacher_config.vocab_size
    shared_vocab, other_tokenizer = None, None
    needed_by = needs_shared_vocab(config) if vocab_check else None
    if same_vocab(teacher_tokenizer, prep.tokenizer) or needed_by:
        student = config.student
        student_rows = rows if not student.name else \
            AutoConfig.from_pretrained(student.name, trust_remote_code=student.trust_remote_code).vocab_size
        shared_vocab = check_same_vocab(teacher_tokenizer, prep.tokenizer, rows, student_rows,
                                        needed_by=needed_by or "logit distillation")
    else:
        other_tokenizer = teacher_tokenizer
        log.info("teacher and student tokenizers differ: the teacher reads the data in its own tokens")
    teacher = open_teacher(config.teacher, teacher_tokenizer, rows, teacher_config)
    return dataclasses.replace(prep, teacher=teacher, shared_vocab=shared_vocab, teacher_tokenizer=other_tokenizer)


def _in_process_use(config: PipelineConfig, stages: list[StageSettings]) -> str | None:
    """What in `stages` needs the teacher's weights in this process (a server gives log-probs and text only)."""
    if config.student.from_teacher is not None:
        return "student.from_teacher (the student is cut from the teacher's layers)"
    if config.teachers:
        return "teachers: (a mixture of teachers, loaded here)"
    for stage in stages:
        if stage.kind == "finetune":
            continue
        if stage.teacher is not None:
            return f"stage {stage.name!r}'s own teacher (stage teacher:, loaded here)"
        if any(isinstance(t, (FeatureTerm, AttentionTerm, ContrastiveTerm)) for t in stage.losses):
            return f"stage {stage.name!r} (its hidden-state / attention terms read the teacher's activations)"
        cross = [t.name for t in stage.losses if isinstance(t, CrossVocabTerm)]
        if cross and stage.teacher_source != "cache":
            return f"stage {stage.name!r}'s {cross[0]} (it runs the teacher on its own tokens beside the student)"
        if stage.eval_driven_sampling is not None and stage.eval_driven_sampling.enabled:
            return f"stage {stage.name!r}'s eval_driven_sampling (the teacher scores the eval sets here)"
    return None


def _asks_server(stage: StageSettings) -> bool:
    """The stage trains on the teacher's generations, samples from it, or scores against its log-probs live."""
    logit_kd = any(isinstance(t, LogitTerm) and t.name != "cross_entropy" for t in stage.losses)
    return stage.kind in ("non_policy", "policy") or (logit_kd and stage.teacher_source != "cache" and
                                                      stage.kind != "finetune")


def served_run(config: PipelineConfig, prep, stages: list[StageSettings], processes):
    """A `run` with teacher.endpoint, checked before any work: the generations its non_policy stages train on are
    written (or finished) through the server first; the stages then train with the server as their teacher
    (`prep.served`: top-k log-probs of every batch, a policy stage's teacher samples; teacher/served_scoring.py).
    The teacher is never loaded in this process (evaluation reports the student alone)."""
    from lmdistill.teacher.generations import write_generations

    use = _in_process_use(config, stages)
    if use is not None:
        raise ConfigError(f"teacher.endpoint serves the teacher elsewhere, but {use} needs it in this process; "
                          "remove teacher.endpoint, or change that stage")
    served_losses_check(stages)
    if not any(_asks_server(stage) for stage in stages):
        return prep
    served = served_teacher(config, prep)
    if any(stage.kind == "non_policy" for stage in stages):
        write_generations(config, served, processes=processes)
    log.info("teacher served at %s: the stages ask it as they train, without loading it", config.teacher.endpoint)
    return dataclasses.replace(prep, served=served.teacher, shared_vocab=served.shared_vocab)
