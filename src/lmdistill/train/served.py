"""A run whose teacher is served (teacher.endpoint): the prepared run gets an EndpointTeacher where it would load
the model. The teacher's tokenizer and config still load from teacher.name, for prompts and the vocabulary check."""

from __future__ import annotations

import dataclasses
import logging

from lmdistill.config import PipelineConfig
from lmdistill.errors import ConfigError
from lmdistill.models.load import load_tokenizer
from lmdistill.models.vocab import check_same_vocab, same_vocab
from lmdistill.teacher.endpoint import open_teacher
from lmdistill.teacher.retokenize import needs_shared_vocab

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
    teacher_tokenizer = load_tokenizer(config.teacher.name)
    rows = teacher_config.vocab_size
    shared_vocab, other_tokenizer = None, None
    needed_by = needs_shared_vocab(config) if vocab_check else None
    if same_vocab(teacher_tokenizer, prep.tokenizer) or needed_by:
        student_rows = AutoConfig.from_pretrained(config.student.name).vocab_size if config.student.name else rows
        shared_vocab = check_same_vocab(teacher_tokenizer, prep.tokenizer, rows, student_rows,
                                        needed_by=needed_by or "logit distillation")
    else:
        other_tokenizer = teacher_tokenizer
        log.info("teacher and student tokenizers differ: the teacher reads the data in its own tokens")
    teacher = open_teacher(config.teacher, teacher_tokenizer, rows, teacher_config)
    return dataclasses.replace(prep, teacher=teacher, shared_vocab=shared_vocab, teacher_tokenizer=other_tokenizer)
