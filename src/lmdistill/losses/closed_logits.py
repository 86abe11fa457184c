"""The full-logits objective with its gradient written out (`closed_form.py`), as the fused path scores its chunks.

Autograd through a divergence keeps about seven [N, V] tensors (both models' log-probs, the teacher's probs, masks,
differences) and runs one backward kernel per forward op, each a pass over memory. Here the forward pass scores the
rows in blocks small enough to stay in cache and writes d (coeffs . sums) / d student logits into one [N, V] buffer;
the backward hands that buffer over. A backward that arrives with other term weights than the expected ones (a
balancer, one term's gradient alone) recomputes the gradient for those weights, so it is always exact. A backward
with create_graph=True (a gradient penalty, a Hessian-vector product) recomputes by autograd, so that the gradient
it returns can be differentiated again.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lmdistill.losses.closed_form import CLOSED_FORMS, RowBlocks, Workspace, block_terms
from lmdistill.losses.divergences import TermSpec, score_rows, upcast
from lmdistill.losses.fused import BUDGET_ELEMENTS


def closed_form_applies(specs: Sequence[TermSpec], student: Tensor, teacher: Tensor | None) -> bool:
    """Every term has a written-out gradient, and only the student's logits need one."""
    return (torch.is_grad_enabled() and student.requires_grad and (teacher is None or not teacher.requires_grad)
            and all(spec.name in CLOSED_FORMS for spec in specs))


def closed_logit_terms(specs: Sequence[TermSpec], coeffs: Sequence[float], student: Tensor, teacher: Tensor | None,
                       labels: Tensor | None, counted: Tensor | None) -> Tensor:
    """Term sums over the counted rows, differentiable w.r.t. student. student [N, V] and teacher [N, V'] logits
    (teacher None when no term needs it), labels [N] or None, counted int64 [n] (None: every row); coeffs: the
    d total / d sums the caller's backward is expected to send, one per term. Returns [terms] float32."""
    return _ClosedLogits.apply(tuple(specs), tuple(coeffs), counted, student, teacher, labels)


def _any_neg_inf(*logits: Tensor | None) -> bool:
    """Whether any logit is -inf: one value read back per call, not one per block. Models rarely mask tokens, and
    blocks without one need neither the log-prob floor nor the +inf checks."""
    return bool(torch.stack([torch.isneginf(t).any() for t in logits if t is not None]).any())


def _score(specs: Sequence[TermSpec], coeffs: Sequence[float], student: Tensor, teacher: Tensor | None,
           labels: Tensor | None, counted: Tensor | None) -> tuple[Tensor, Tensor]:
    """(sums [terms], d (coeffs . sums) / d student [N, V] in student's dtype, zero on rows not counted)."""
    rows = [t.index_select(0, counted) if t is not None and counted is not None else t
            for t in (student, teacher, labels)]
    s_rows, t_rows, l_rows = rows
    grad = torch.empty_like(s_rows)
    masked = _any_neg_inf(s_rows, t_rows)

    def score(block: slice, work: Workspace) -> Tensor:
        s_logits = upcast(s_rows[block])
        target = grad[block]  # float32 logits get their gradient written in place, others through a copy
        sums, block_grad = block_terms(specs, coeffs, s_logits, upcast(t_rows[block]) if t_rows is not None else None,
                                       l_rows[block] if l_rows is not None else None, work, masked,
                                       out=target if target.dtype == s_logits.dtype else None)
        if block_grad is not target:
            target.copy_(block_grad)
        return sums

    # A GPU takes blocks of the fused path's chunk budget: all N rows at once would hold about ten [N, V] buffers.
    total = RowBlocks(BUDGET_ELEMENTS).run(s_rows.shape[0], s_rows.shape[1], student.device, score)
    if total is None:
        total = torch.zeros(len(specs), dtype=torch.promote_types(student.dtype, torch.float32), device=student.device)
    if counted is not None:
        grad = torch.zeros_like(student).index_copy_(0, counted, grad)
    return total, grad


class _ClosedLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, specs, coeffs, counted, student, teacher, labels):
        sums, grad = _score(specs, coeffs, student, teacher, labels, counted)
        ctx.specs, ctx.coeffs, ctx.counted = specs, coeffs, counted
        ctx.save_for_backward(student, teacher, labels)
        ctx.grad = grad  # not saved: handed over once (below), so it must not be version-checked on a later backward
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        student, teacher, labels = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the written-out gradient has no graph to differentiate again
            rows = [t.index_select(0, ctx.counted) if t is not None and ctx.counted is not None else t
                    for t in (student, teacher, labels)]
            objective = (score_rows(ctx.specs, *rows) * grad_sums).sum()
            return None, None, None, torch.autograd.grad(objective, student, create_graph=True)[0], None, None
        expected = torch.tensor(ctx.coeffs, dtype=grad_sums.dtype, device=grad_sums.device)
        norm = float((expected * expected).sum())
        scale = float((grad_sums * expected).sum()) / norm if norm > 0 else 0.0
        if ctx.grad is not None and norm > 0 and torch.allclose(grad_sums, scale * expected, rtol=1e-6, atol=0.0):
            # the expected backward (up to a factor): hand over the gradient formed in the forward pass. Autograd may
            # keep the handed-over tensor as a leaf's .grad and add the next backward into it, so it is given once;
            # a later backward of a retained graph recomputes.
            if abs(scale - 1.0) >= 1e-6:
                return None, None, None, ctx.grad * scale, None, None
            grad, ctx.grad = ctx.grad, None
            return None, None, None, grad, None, None
        with torch.no_grad():
            grad = _score(ctx.specs, grad_sums.tolist(), student, teacher, labels, ctx.counted)[1]
        return None, None, None, grad, None, None
