"""Teacher/student tokenizer compatibility: logit losses compare distributions id by id, so ids must mean the same."""

from __future__ import annotations

from lmdistill.errors import ModelError


ACROSS_TOKENIZERS = (
    "Two paths work across tokenizers: sequence-level KD, training on the teacher's text (a stage with kind: "
    "non_policy, or teacher_source: generations, and losses: [{name: cross_entropy}]), or logit KD across "
    "tokenizers (a stage with losses: [{name: uld}] or [{name: cross_vocab_kl}], optionally beside cross_entropy, "
    "with the teacher live or from `lmdistill cache-teacher`); or pick a student from the teacher's family.")


def same_vocab(teacher_tokenizer, student_tokenizer) -> bool:
    """Whether both tokenizers map every token string to the same id."""
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()


def check_same_vocab(teacher_tokenizer, student_tokenizer, teacher_vocab_rows: int, student_vocab_rows: int,
                     needed_by: str = "logit distillation") -> int:
    """Return the shared vocabulary size that logit losses use.

    Embedding matrices are often padded past the tokenizer (Qwen2.5: 151,936 vs 152,064 rows): those extra rows are
    never a real token, so the losses slice both models' logits to the shared tokenizer size. A real difference in the
    token-to-id mapping is an error naming the first differing tokens, what needs them equal (`needed_by`), and the
    paths that work across tokenizers.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        t_by_id = {i: tok for tok, i in t_vocab.items()}
        s_by_id = {i: tok for tok, i in s_vocab.items()}
        differing = [(i, t_by_id.get(i), s_by_id.get(i)) for i in sorted(set(t_by_id) | set(s_by_id))
                     if t_by_id.get(i) != s_by_id.get(i)][:3]
        shown = ", ".join(f"id {i}: teacher {t!r} vs student {s!r}" for i, t, s in differing)
        raise ModelError(
            f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens; first differences: {shown}), "
            f"but {needed_by} compares token ids one by one. {ACROSS_TOKENIZERS}")
    shared = max(t_vocab.values()) + 1
    if shared > min(teacher_vocab_rows, student_vocab_rows):
        raise ModelError(
            f"the tokenizer has {shared} ids but a model's output layer has only "
            f"{min(teacher_vocab_rows, student_vocab_rows)} rows; resize the model's embeddings to the tokenizer")
    return shared
