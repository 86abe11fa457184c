"""Teacher/student tokenizer compatibility: logit losses compare distributions id by id, so ids must mean the same."""

from __future__ import annotations

from lmdistill.errors import ModelError


def check_same_vocab(teacher_tokenizer, student_tokenizer, teacher_vocab_rows: int, student_vocab_rows: int) -> int:
    """Return the shared vocabulary size that logit losses use.

    Embedding matrices are often padded past the tokenizer (Qwen2.5: 151,936 vs 152,064 rows): those extra rows are
    never a real token, so the losses slice both models' logits to the shared tokenizer size. A real difference in the
    token-to-id mapping is an error naming the first differing tokens.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        t_by_id = {i: tok for tok, i in t_vocab.items()}
        s_by_id = {i: tok for tok, i in s_vocab.items()}
        differing = [(i, t_by_id.get(i), s_by_id.get(i)) for i in sorted(set(t_by_id) | set(s_by_id))
                     if t_by_id.get(i) != s_by_id.get(i)][:3]
        shown = ", ".join(f"id {i}: teacher {t!r} vs student {s!r}" for i, t, s in differing)
        raise ModelError(
            f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens; first differences: {shown}). "
            "Logit distillation needs the same vocabulary: pick a student from the teacher's family, or use "
            "sequence-level KD (teacher_source: generations) which only needs text.")
    shared = max(t_vocab.values()) + 1
    if shared > min(teacher_vocab_rows, student_vocab_rows):
        raise ModelError(
            f"the tokenizer has {shared} ids but a model's output layer has only "
            f"{min(teacher_vocab_rows, student_vocab_rows)} rows; resize the model's embeddings to the tokenizer")
    return shared
