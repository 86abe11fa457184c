"""Losses fused with the output layer: logits are formed one chunk of tokens at a time inside the loss.

Full [B, T, V] logits never exist: per chunk, both models' logits are computed from hidden states and the
lm_head, scored, and differentiated right away (see `engine.py`), so the memory is the lm_head weight
gradient plus one [chunk, V] block per model. Handles tied embeddings (pass the embedding matrix: autograd
adds the gradient into the shared parameter), an lm_head bias, a logit scale (Cohere's `logit_scale`,
applied first) and final-logit soft-capping (Gemma's `final_logit_softcapping`, applied after). Student
and teacher vocabularies that differ only by padding rows are compared on the shared prefix. In place of a
teacher, a top-k teacher cache (ids, log-probs, tail mass per token) can be passed: its rows are sliced with the
student's, so the cached KD terms too see only one chunk of student logits at a time. Several teachers' heads
are mixed per chunk (`losses.mixture`), so no teacher's full logits exist either.

Time: every term but top-k KL has its gradient written out (`closed_form.py`), so a chunk costs its matmuls plus a
few passes over small blocks of rows that stay in cache, split over the cores (`closed_form.RowBlocks`), with the
student's gradient written over its product buffer; autograd runs only for top-k KL or when a teacher needs
gradients. The chunk size comes from a memory budget for the [chunk, V] product buffers (one per model): large
chunks keep the matmuls efficient and add the lm_head gradient into its one float32 buffer fewer times.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.losses.closed_form import CLOSED_FORMS, RowBlocks, Workspace, block_terms
from lmdistill.losses.divergences import TermSpec, check_params, check_temperature, score_rows, upcast
from lmdistill.losses.engine import ClosedFn, ClosedForm, Head, reduce_rows
from lmdistill.losses.errors import LossInputError
from lmdistill.losses.functional import backward_coeffs, cache_rows, counted_rows, finish
from lmdistill.losses.mixture import mixture_logits


BUDGET_ELEMENTS = 2**26  # all [chunk, V] product buffers together: 256 MiB in float32, whatever the vocabulary
AUTOGRAD_BLOCK_ELEMENTS = 2**24  # per [chunk, V] block when autograd runs: it keeps about ten of them per chunk


def default_chunk_size(vocab_size: int, n_models: int = 2, closed_form: bool = True) -> int:
    """Tokens per chunk from the memory budget: n_models [chunk, V] products within BUDGET_ELEMENTS when the
    gradients are written out (220 at V = 151,936 for a student and a teacher), else one autograd block of
    AUTOGRAD_BLOCK_ELEMENTS (110)."""
    if closed_form:
        return max(1, BUDGET_ELEMENTS // (n_models * vocab_size))
    return max(1, AUTOGRAD_BLOCK_ELEMENTS // vocab_size)


@dataclass(frozen=True)
class LMHead:
    """A model's output layer: weight [V, H], optional bias [V], soft-cap and scale as in its config."""

    weight: Tensor
    bias: Tensor | None = None
    softcap: float | None = None
    logit_scale: float = 1.0

    def logits(self, product: Tensor) -> Tensor:
        """hidden @ weight.T + bias [n, V] (formed by the engine) -> float32 logits with scale and soft-cap."""
        logits = upcast(product)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def product_grad(self, logits: Tensor, grad: Tensor, out: Tensor) -> None:
        """d/d product from d/d logits [n, V] (overwritten), given the logits `logits` returned; written into out."""
        if self.softcap:  # d softcap tanh(x / softcap) / dx = 1 - tanh^2
            grad.mul_(torch.div(logits, self.softcap).square_().neg_().add_(1.0))
        if self.logit_scale != 1.0:
            grad.mul_(self.logit_scale)
        if grad is not out:
            out.copy_(grad)


def _check_head(hidden: Tensor, head: LMHead, who: str) -> None:
    if hidden.shape[-1] != head.weight.shape[-1]:
        raise LossInputError(f"{who} hidden size {hidden.shape[-1]} does not match its lm_head weight "
                             f"{tuple(head.weight.shape)}; pass the last hidden states and the output layer "
                             "of the same model")


def fused_terms(specs: Sequence[TermSpec], student_hidden: Tensor, student_head: LMHead,
                teacher_hidden: Tensor | Sequence[Tensor] | None, teacher_head: LMHead | Sequence[LMHead] | None,
                labels: Tensor | None, chunk_size: int | None, coeffs: Tensor | None = None,
                teacher_ids: Tensor | None = None, teacher_logprobs: Tensor | None = None,
                teacher_tail: Tensor | None = None, mixture: Sequence[float] | None = None,
                mixture_temperature: float = 1.0) -> tuple[Tensor, int]:
    """Term sums over counted tokens. student_hidden [..., Hs]; teacher_hidden [..., Ht] (or None when no term
    needs the teacher's logits); labels [...]; for 'topk_kl' a teacher cache in place of the teacher:
    teacher_ids / teacher_logprobs [..., k] and teacher_tail [...] (or None). Several teachers: teacher_hidden and
    teacher_head one per teacher and `mixture` their weights; each chunk's target is their mixture at
    `mixture_temperature` (`losses.mixture`), as the logits path forms it. chunk_size None: `default_chunk_size`.
    Returns ([terms] float32, count of counted tokens)."""
    _check_head(student_hidden, student_head, "student")
    # The cache is sliced per chunk with the hidden states, so each chunk's logits meet their own top-k rows.
    ids, lps, tails = cache_rows(student_hidden, "hidden states", student_head.weight.shape[0], teacher_ids,
                                 teacher_logprobs, teacher_tail)
    s_rows = student_hidden.reshape(-1, student_hidden.shape[-1])  # [N, Hs]
    t_heads, t_rows = [], []
    if teacher_hidden is not None and teacher_head is not None:
        several = not isinstance(teacher_head, LMHead)
        t_heads = list(teacher_head) if several else [teacher_head]
        if several and (mixture is None or len(mixture) != len(t_heads)):
            raise LossInputError(f"{len(t_heads)} teacher heads need as many mixture weights, got {mixture}")
        for hidden, head in zip(list(teacher_hidden) if several else [teacher_hidden], t_heads, strict=True):
            _check_head(hidden, head, "teacher")
            if hidden.shape[:-1] != student_hidden.shape[:-1]:
                raise LossInputError(f"student hidden states {tuple(student_hidden.shape)} and teacher hidden "
                                     f"states {tuple(hidden.shape)} must cover the same tokens")
            t_rows.append(hidden.reshape(-1, hidden.shape[-1]))  # [N, Ht]
    flat_labels, counted, count = counted_rows(labels, s_rows.shape[0])
    n_teachers = len(t_heads)

    def fn(rows: Sequence[Tensor | None], shared: Sequence[Tensor | None]) -> Tensor:
        # The heads' products [n, V], one per model; labels [n], cache rows [n, k], tails [n].
        s_product, t_products, rest = rows[0], rows[1: 1 + n_teachers], rows[1 + n_teachers:]
        t_logits = [head.logits(product) for head, product in zip(t_heads, t_products)]
        if len(t_logits) > 1:  # the mixture per chunk: [chunk, V] per teacher, never [N, V]
            t_logits = [mixture_logits(t_logits, mixture, mixture_temperature)]
        return score_rows(specs, student_head.logits(s_product), t_logits[0] if t_logits else None, *rest)

    shared: list[Tensor | None] = [student_head.weight, student_head.bias]
    heads = [Head(0, 0, 1 if student_head.bias is not None else None)]
    for i, head in enumerate(t_heads):
        shared += [head.weight, head.bias]
        heads.append(Head(1 + i, 2 + 2 * i, 3 + 2 * i if head.bias is not None else None))
    closed = None
    teacher_tensors = [t for head, rows in zip(t_heads, t_rows) for t in (head.weight, head.bias, rows)]
    teacher_grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in teacher_tensors)
    if all(spec.name in CLOSED_FORMS for spec in specs) and not teacher_grads:
        closed = ClosedForm(_closed_fn(specs, student_head, t_heads, mixture, mixture_temperature), rows=(0,))
    if chunk_size is None:
        vocab = max(head.weight.shape[0] for head in [student_head, *t_heads])
        chunk_size = default_chunk_size(vocab, 1 + n_teachers, closed is not None)
    return reduce_rows(fn, [s_rows, *t_rows, flat_labels, ids, lps, tails], shared, counted, chunk_size,
                       coeffs, heads, closed), count


def _closed_fn(specs: Sequence[TermSpec], student_head: LMHead, t_heads: Sequence[LMHead],
               mixture: Sequence[float] | None, mixture_temperature: float) -> ClosedFn:
    """The engine's ClosedForm function for the student's head: scores a chunk block by block and writes
    d (weights . sums) / d student product over the product itself."""
    blocks = RowBlocks(BUDGET_ELEMENTS)  # its block buffers serve every chunk of this call
    # Products of finite hidden states and weights are finite: only a -inf bias entry masks a token.
    masked = any(head.bias is not None and bool(torch.isneginf(head.bias).any()) for head in [student_head, *t_heads])

    def fn(rows: Sequence[Tensor | None], shared: Sequence[Tensor | None],
           weights: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        s_product, t_products, labels = rows[0], rows[1: 1 + len(t_heads)], rows[1 + len(t_heads)]
        coeffs = weights.expand(len(specs)).tolist()

        def score(block: slice, work: Workspace) -> Tensor:
            s_logits = student_head.logits(s_product[block])
            t_logits = [head.logits(product[block]) for head, product in zip(t_heads, t_products)]
            if len(t_logits) > 1:
                t_logits = [mixture_logits(t_logits, mixture, mixture_temperature)]
            # The gradient goes straight over the product when the logits are the product itself (float32, no
            # scale or soft-cap): no copy per block.
            target = s_product[block]
            sums, grad = block_terms(specs, coeffs, s_logits, t_logits[0] if t_logits else None,
                                     labels[block] if labels is not None else None, work, masked,
                                     out=target if s_logits.data_ptr() == target.data_ptr() else None)
            student_head.product_grad(s_logits, grad, out=target)
            return sums

        return blocks.run(s_product.shape[0], s_product.shape[1], s_product.device, score), {0: s_product}

    return fn


def fused_distill_loss(student_hidden: Tensor, student_lm_head_weight: Tensor, teacher_hidden: Tensor,
                       teacher_lm_head_weight: Tensor, labels: Tensor | None = None, *, loss: str = "forward_kl",
                       temperature: float = 1.0, reduction: str = "mean", chunk_size: int | None = None,
                       student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                       student_softcap: float | None = None, teacher_softcap: float | None = None,
                       student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                       **loss_params: float) -> Tensor:
    """One logit loss (a divergence name, or 'cross_entropy') computed from hidden states and lm_heads.

    student_hidden [..., Hs], student_lm_head_weight [Vs, Hs]; teacher_hidden [..., Ht], teacher weight
    [Vt, Ht]; labels [...] aligned with the hidden states (-100 = not counted). `loss_params` are the
    divergence's keywords (e.g. beta=0.5). Equals the same loss on `hidden @ weight.T (+ bias)` logits.
    `chunk_size` None picks `default_chunk_size` of the larger vocabulary.
    """
    params = check_params(loss, loss_params)
    spec = TermSpec(loss, 1.0 if loss == "cross_entropy" else check_temperature(temperature), params)
    student = LMHead(student_lm_head_weight, student_bias, student_softcap, student_logit_scale)
    teacher = LMHead(teacher_lm_head_weight, teacher_bias, teacher_softcap, teacher_logit_scale)
    coeffs = backward_coeffs(labels, student_hidden[..., 0].numel(), reduction, student_hidden.device)
    sums, count = fused_terms([spec], student_hidden, student, teacher_hidden, teacher, labels, chunk_size, coeffs)
    return finish(sums[0], count, reduction)
