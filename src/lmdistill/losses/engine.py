"""Memory-bounded evaluation of per-token loss terms, one chunk of counted tokens at a time.

`reduce_rows(fn, rows, shared, counted, chunk_size)` returns fn's term sums over the counted rows. Row
inputs ([N, ...]: logits, hidden states, labels) are sliced per chunk; shared inputs (lm_head weight and
bias) are used whole by every chunk. With `chunk_size=None` it is a plain autograd call. With a chunk size
a custom autograd function computes each chunk's gradient right away, so only one chunk's [chunk, V]
temporaries ever exist, and keeps just the input gradients (the size of the inputs themselves).

`heads` name linear maps (a row input times a shared weight, plus a shared bias) that the engine applies
itself, so that fn receives their products (the logits) in place of the rows. Per chunk the product goes into
one buffer reused by every chunk, and the weight's gradient is added into a single float32 accumulator
(addmm_): autograd would allocate a fresh [V, H] gradient per chunk, and at V = 151,936 that allocation, not
the matmuls, dominated the time.

Gradients are formed in the forward pass for the linear combination `coeffs . terms` the caller expects
to backpropagate (the objective's weights). If backward later arrives with any other combination (a
balancer rescaling terms, one term's gradient alone), the chunks are recomputed for that combination:
always exact, and the common case pays no recomputation.

A `ClosedForm` may stand in for autograd: it scores a chunk from the heads' products and returns, with the sums, the
gradient w.r.t. those products that it writes out itself (no autograd graph over [chunk, V] tensors). The engine uses
it whenever every input that needs a gradient lies behind one of its heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.losses.errors import LossInputError

RowFn = Callable[[Sequence[Tensor | None], Sequence[Tensor | None]], Tensor]  # (row chunks, shared) -> [terms]
# (row chunks with the heads' products, shared, weights [terms]) -> ([terms], {row: d (weights . terms) / d product})
ClosedFn = Callable[[Sequence[Tensor | None], Sequence[Tensor | None], Tensor], tuple[Tensor, dict[int, Tensor]]]


@dataclass(frozen=True)
class Head:
    """rows[row] [n, H] @ shared[weight].T (+ shared[bias]) -> [n, V], formed by the engine: fn gets the product
    in place of rows[row]."""

    row: int
    weight: int
    bias: int | None = None

    def apply(self, rows: Sequence[Tensor | None], shared: Sequence[Tensor | None]) -> Tensor | None:
        hidden = rows[self.row]
        if hidden is None:
            return None
        return torch.nn.functional.linear(hidden, shared[self.weight],
                                          shared[self.bias] if self.bias is not None else None)


@dataclass(frozen=True)
class ClosedForm:
    """fn scores a chunk and returns the gradients of the products of the heads on `rows`, which it may overwrite
    (the products are rebuilt for every chunk)."""

    fn: ClosedFn
    rows: tuple[int, ...]


def reduce_rows(fn: RowFn, rows: Sequence[Tensor | None], shared: Sequence[Tensor | None], counted: Tensor | None,
                chunk_size: int | None, coeffs: Tensor | None = None, heads: Sequence[Head] = (),
                closed: ClosedForm | None = None) -> Tensor:
    """Sum fn over the counted rows.

    rows: tensors [N, ...] (or None); shared: tensors used whole (or None); counted: int64 [n] indices of the
    rows to score (None = all N); coeffs: [terms] expected backward weights (default all ones); heads: linear
    maps applied to rows before fn sees them; closed: fn with its gradients written out (chunked only).
    Returns [terms] float32 sums, differentiable w.r.t. every tensor input.
    """
    if chunk_size is None:
        if counted is not None:
            rows = [r.index_select(0, counted) if r is not None else None for r in rows]
        return fn(_with_heads(rows, shared, heads), shared)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    n_rows = next(r for r in rows if r is not None).shape[0]
    if counted is None:
        counted = torch.arange(n_rows, device=next(r for r in rows if r is not None).device)
    plan = _Plan(fn, len(rows), counted, chunk_size, coeffs, tuple(heads), closed)
    tensors = [*rows, *shared]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _ChunkedRows.apply(plan, *tensors)
    with torch.no_grad():
        return _run(plan, tensors, needs=[False] * len(tensors), weights=None)[0]


@dataclass(frozen=True)
class _Plan:
    fn: RowFn
    n_rows: int
    counted: Tensor
    chunk_size: int
    coeffs: Tensor | None
    heads: tuple[Head, ...] = ()
    closed: ClosedForm | None = None


def _with_heads(rows: Sequence[Tensor | None], shared: Sequence[Tensor | None],
                heads: Sequence[Head]) -> list[Tensor | None]:
    out = list(rows)
    for head in heads:
        out[head.row] = head.apply(rows, shared)
    return out


def _run(plan: _Plan, tensors: Sequence[Tensor | None], needs: Sequence[bool],
         weights: Tensor | None) -> tuple[Tensor, list[Tensor | None]]:
    """One pass over the chunks: term sums, and gradients of `weights . sums` for the inputs in `needs`."""
    rows, shared = tensors[: plan.n_rows], tensors[plan.n_rows:]
    row_needs, shared_needs = needs[: plan.n_rows], needs[plan.n_rows:]
    grads: list[Tensor | None] = [torch.zeros_like(r) if need else None for r, need in zip(rows, row_needs)]
    # Shared gradients add up over chunks: accumulate in float32, cast back once at the end.
    grads += [torch.zeros_like(s, dtype=torch.promote_types(s.dtype, torch.float32)) if need else None
              for s, need in zip(shared, shared_needs)]
    shared_leaves = [s.detach().requires_grad_(need) if s is not None else None
                     for s, need in zip(shared, shared_needs)]
    heads = [h for h in plan.heads if rows[h.row] is not None]
    by_row = {h.row: _HeadState(h, rows[h.row], shared, plan.chunk_size) for h in heads}
    head_params = {i for h in heads for i in (h.weight, h.bias) if i is not None}
    total: Tensor | None = None
    closed = plan.closed if weights is not None and _covers(plan, needs) else None
    for idx in torch.split(plan.counted, plan.chunk_size):
        raw = [r.index_select(0, idx) if r is not None else None for r in rows]
        if closed is not None:
            with torch.no_grad():
                products = list(raw)
                for row, state in by_row.items():
                    products[row] = state.product(raw[row])
                sums, product_grads = closed.fn(products, shared, weights)
                for row, g in product_grads.items():
                    by_row[row].backward(g, raw[row], idx, needs, plan.n_rows, grads)
            total = sums if total is None else total + sums
            continue
        chunk = [r.requires_grad_(need) if r is not None and i not in by_row else r
                 for i, (r, need) in enumerate(zip(raw, row_needs))]
        with torch.no_grad():
            for row, state in by_row.items():
                chunk[row] = state.product(raw[row]).requires_grad_(_head_needs(state.head, needs, plan.n_rows))
        # Autograd stops at the heads' products; their rows and parameters get their gradients by hand below.
        targets = [(i, t) for i, t in enumerate([*chunk, *shared_leaves])
                   if t is not None and (t.requires_grad if i in by_row else needs[i] and i - plan.n_rows not in head_params)]
        with torch.enable_grad():
            sums = plan.fn(chunk, shared_leaves)  # [terms]
            objective = (sums * weights).sum() if targets and weights is not None else None
        if objective is not None and objective.requires_grad:
            parts = torch.autograd.grad(objective, [t for _, t in targets], allow_unused=True)
            for (i, _), g in zip(targets, parts):
                if g is None:
                    continue
                if i in by_row:
                    with torch.no_grad():
                        by_row[i].backward(g, raw[i], idx, needs, plan.n_rows, grads)
                elif i < plan.n_rows:
                    grads[i].index_copy_(0, idx, g.to(grads[i].dtype))
                else:
                    grads[i] += g
        total = sums.detach() if total is None else total + sums.detach()
    if total is None:  # no counted rows: every term is an empty sum
        with torch.no_grad():
            total = plan.fn(_with_heads([r[:0] if r is not None else None for r in rows], shared, heads), shared)
    grads = [g.to(t.dtype) if g is not None and i >= plan.n_rows else g
             for i, (g, t) in enumerate(zip(grads, tensors))]
    return total, grads


def _covers(plan: _Plan, needs: Sequence[bool]) -> bool:
    """Whether plan.closed gives every gradient asked for: each input needing one is a row or parameter of a head
    whose product gradient it returns."""
    if plan.closed is None:
        return False
    heads = [h for h in plan.heads if h.row in plan.closed.rows]
    covered = {h.row for h in heads} | {plan.n_rows + i for h in heads for i in (h.weight, h.bias) if i is not None}
    return all(i in covered for i, need in enumerate(needs) if need)


def _head_needs(head: Head, needs: Sequence[bool], n_rows: int) -> bool:
    return needs[head.row] or needs[n_rows + head.weight] or head.bias is not None and needs[n_rows + head.bias]


class _HeadState:
    """One head during a pass: its weight in the rows' dtype (cast once, as autocast would per chunk), the reused
    product buffer, and the low-precision weight-gradient buffer."""

    def __init__(self, head: Head, hidden: Tensor, shared: Sequence[Tensor | None], chunk_size: int) -> None:
        self.head = head
        self.weight = shared[head.weight].detach().to(hidden.dtype)
        bias = shared[head.bias] if head.bias is not None else None
        self.bias = bias.detach().to(hidden.dtype) if bias is not None else None
        self.out = hidden.new_empty((min(chunk_size, hidden.shape[0]), self.weight.shape[0]))
        self.scratch: Tensor | None = None

    def product(self, hidden: Tensor) -> Tensor:
        """hidden [n, H] @ weight.T (+ bias) -> [n, V], a view of the reused buffer."""
        out = self.out[: hidden.shape[0]]
        torch.mm(hidden, self.weight.t(), out=out)
        if self.bias is not None:
            out += self.bias
        return out

    def backward(self, grad: Tensor, hidden: Tensor, idx: Tensor, needs: Sequence[bool], n_rows: int,
                 grads: list[Tensor | None]) -> None:
        """Add one chunk's gradients through the head, given the product's gradient grad [n, V]."""
        head = self.head
        if needs[head.row]:
            grads[head.row].index_copy_(0, idx, (grad @ self.weight).to(grads[head.row].dtype))  # autocast: bf16
        w_grad = grads[n_rows + head.weight]
        if w_grad is not None:
            if w_grad.dtype == grad.dtype:
                w_grad.addmm_(grad.t(), hidden)
            else:  # a low-precision matmul into a reused buffer, added in float32
                if self.scratch is None:
                    self.scratch = torch.empty_like(self.weight)
                w_grad += torch.mm(grad.t(), hidden, out=self.scratch)
        if head.bias is not None and (b_grad := grads[n_rows + head.bias]) is not None:
            b_grad += grad.sum(0)


class _ChunkedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: Tensor | None) -> Tensor:
        needs = list(ctx.needs_input_grad[1:])
        coeffs = plan.coeffs if plan.coeffs is not None else torch.ones((), device=plan.counted.device)
        sums, grads = _run(plan, tensors, needs, coeffs)
        ctx.plan, ctx.needs = plan, needs
        ctx.present = [t is not None for t in tensors]
        ctx.save_for_backward(*[t for t in tensors if t is not None])
        # Not saved: handed over once (below), so they must not be version-checked on a later backward.
        ctx.stored = grads
        return sums

    @staticmethod
    def backward(ctx, grad_sums: Tensor) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        saved = iter(ctx.saved_tensors)
        tensors = [next(saved) if present else None for present in ctx.present]
        if torch.is_grad_enabled():  # its gradients are formed chunk by chunk, outside any graph
            raise LossInputError("a chunked or fused loss gives first derivatives only, but this backward asks for "
                                 "a graph of them (create_graph=True): compute the loss on full logits "
                                 "(fused: false, chunk_size: null) to differentiate it twice")
        if not grad_sums.any():
            return (None,) * (1 + len(tensors))
        coeffs = (plan.coeffs if plan.coeffs is not None else torch.ones(())).to(grad_sums).expand_as(grad_sums)
        norm = float((coeffs * coeffs).sum())
        scale = float((grad_sums * coeffs).sum()) / norm if norm > 0 else 0.0
        if ctx.stored is not None and norm > 0 and torch.allclose(grad_sums, scale * coeffs, rtol=1e-6, atol=0.0):
            if abs(scale - 1.0) >= 1e-6:
                return (None, *[g * scale if g is not None else None for g in ctx.stored])
            # The expected backward: hand over the stored gradients, no copy. Autograd may keep one as a leaf's .grad
            # and add the next backward into it, so they are given once; a retained graph's next backward recomputes.
            stored, ctx.stored = ctx.stored, None
            return (None, *stored)
        with torch.no_grad():
            grads = _run(plan, tensors, ctx.needs, grad_sums)[1]
        return (None, *grads)
