"""Logit terms scored together with their gradient w.r.t. the student logits, written out in closed form.

The fused path (`fused.py`) needs d loss / d student logits for every chunk. Autograd through a divergence keeps each
[n, V] intermediate and runs one backward kernel per forward op: at V = 151,936 that elementwise work cost more than
the matmuls. Written out, each term is a few passes over buffers reused for every block of rows.

With a = s / T, q = softmax(a), p = softmax(t / T) and a term T^2 D(p, q): d/ds = T dD/da, and when g = dD/dq (q taken
as a free vector), dD/da = q * (g - <q, g>) (the softmax Jacobian). Per term, m being the divergence's mixture:
    forward_kl        dD/da = q - p
    reverse_kl        g = log q - log p                    -> q * (lq - lp - KL(q || p))
    jsd(beta)         g = (1 - beta) (log q - log m)        -> (1 - beta) q * (lq - lm - KL(q || m))
    skew_kl(alpha)    g = -(1 - alpha) p / m                -> (1 - alpha) (q R - r),  r = q p / m, R = sum_v r
    skew_reverse_kl   g = log q - log m - alpha q / m      (m = alpha q + (1 - alpha) p)
    tvd               g = sign(q - p) / 2
    cross_entropy     d/ds = softmax(s) - onehot(label)     (T = 1, the whole student vocabulary)
When logits may hold -inf (masked tokens), log-probs are floored at the dtype's lowest value, so a token a side gives no
mass adds 0, never NaN, to every sum and gradient, as in `divergences`. Where `divergences` gives +inf (KL(a || b) with
a > 0 = b: reverse KL on a token the student gives mass and the teacher none, forward KL the other way round,
cross-entropy on a masked label), the floor alone would give a huge finite value that a non-finite step guard lets
through: such a sum is +inf here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import Tensor

from lmdistill.losses.divergences import KERNELS, TermSpec
from lmdistill.losses.errors import LossInputError

CLOSED_FORMS = frozenset({*KERNELS, "cross_entropy"})  # every term but topk_kl, which stays on autograd


ROW_BLOCK_ELEMENTS = 2**18  # a CPU's [rows, V] scratch blocks: 1 MiB in float32, so they stay in one core's cache

BlockFn = Callable[[slice, "Workspace"], Tensor]  # (rows of a block, that thread's buffers) -> [terms] sums


class Workspace:
    """[n, V] buffers reused by every block: each name is allocated once, at the first (largest) block's size."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, like: Tensor) -> Tensor:
        """An uninitialised [n, V] buffer with like's shape, dtype and device."""
        n, v = like.shape
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < n or buf.shape[1] != v or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty((n, v), dtype=like.dtype, device=like.device)
        return buf[:n]


def _row_dot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """sum_v a * b per row: [n, V] x [n, V] -> [n], the product in scratch."""
    return torch.mul(a, b, out=scratch).sum(-1)


class _Distributions:
    """Log-probs and probs of one block per (model, temperature, vocabulary), computed once and shared by the terms."""

    def __init__(self, work: Workspace, masked: bool) -> None:
        self.work, self.masked = work, masked
        self._done: dict[tuple[str, float, int], tuple[Tensor, Tensor]] = {}
        self._floored: list[Tensor] = []  # the log-probs floored (masked: -inf entries may be there)

    def get(self, which: str, logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
        """(log softmax(logits / T), softmax(logits / T)), each [n, V]; log-probs floored when masked."""
        key = (which, temperature, logits.shape[-1])
        if key not in self._done:
            name = f"{which}{len(self._done)}"
            log_probs = self.work.get(name + "_log", logits)
            if temperature != 1.0:
                logits = torch.div(logits, temperature, out=self.work.get("scaled", logits))
            torch.log_softmax(logits, -1, out=log_probs)
            if self.masked:
                self._floored.append(log_probs.clamp_min_(torch.finfo(log_probs.dtype).min))
            self._done[key] = log_probs, torch.exp(log_probs, out=self.work.get(name, logits))
        return self._done[key]

    def floored(self, log_probs: Tensor) -> bool:
        """Whether log_probs (from `get`) were floored: they may hold tokens with no mass."""
        return any(log_probs is done for done in self._floored)

    def kl_sum(self, value: Tensor, mass: Tensor, log_probs: Tensor, scratch: Tensor) -> Tensor:
        """value, a sum of KL(mass || b) with b's log_probs, or +inf where mass falls on a token b gives none (its
        log-prob floored), as `divergences` gives it. Free unless masked; no value is read back to the host."""
        if not self.floored(log_probs):
            return value
        missing = torch.eq(log_probs, torch.finfo(log_probs.dtype).min, out=scratch)  # 1 where b has no mass
        return value.masked_fill(torch.dot(mass.view(-1), missing.view(-1)) > 0, math.inf)


def _log_mixture(p: Tensor, q: Tensor, weight_p: float, out: Tensor) -> Tensor:
    """log(weight_p p + (1 - weight_p) q) into out, formed from the probs (logaddexp on the log-probs cost as much as
    the rest of the term). Floored at the smallest normal number: a token both sides give (next to) no mass gets a
    finite log, and the terms it weighs change by less than that number."""
    torch.lerp(q, p, weight_p, out=out)
    return out.clamp_min_(torch.finfo(out.dtype).tiny).log_()


def _kd_term(spec: TermSpec, coeff: float, dist: _Distributions, student: Tensor, teacher: Tensor, grad: Tensor,
             work: Workspace) -> Tensor:
    """One divergence's sum over the block (with T^2); adds coeff * its gradient w.r.t. the student logits to grad."""
    t = spec.temperature
    lq, q = dist.get("student", student, t)
    lp, p = dist.get("teacher", teacher, t)
    c = coeff * t  # T^2 from the term, 1/T from a = s / T
    name, params = spec.name, spec.params
    beta = params.get("beta", params.get("alpha"))
    if name == "jsd" and beta == 1.0:  # TRL GKD's mapping of the ends, as `divergences.jsd_kernel`
        name = "reverse_kl"
    elif name != "tvd" and beta == 0.0:
        name = "forward_kl" if name in ("jsd", "skew_kl") else "reverse_kl"
    d, e, scratch = work.get("diff", lq), work.get("extra", lq), work.get("product", lq)
    if name == "forward_kl":
        value = dist.kl_sum(torch.dot(p.view(-1), torch.sub(lp, lq, out=d).view(-1)), p, lq, scratch)
        grad.add_(q, alpha=c).sub_(p, alpha=c)
    elif name == "reverse_kl":
        rows = _row_dot(q, torch.sub(lq, lp, out=d), scratch)  # KL(q || p) per token
        value = dist.kl_sum(rows.sum(), q, lp, scratch)
        grad.addcmul_(q, d.sub_(rows[:, None]), value=c)
    elif name == "jsd":
        lm = _log_mixture(p, q, beta, e)
        rows = _row_dot(q, torch.sub(lq, lm, out=d), scratch)  # KL(q || m) per token
        value = beta * torch.dot(p.view(-1), torch.sub(lp, lm, out=e).view(-1)) + (1.0 - beta) * rows.sum()
        grad.addcmul_(q, d.sub_(rows[:, None]), value=c * (1.0 - beta))
    elif name == "skew_kl":
        diff = torch.sub(lp, _log_mixture(p, q, beta, e), out=e)  # log p - log m
        value = torch.dot(p.view(-1), diff.view(-1))
        r = torch.add(diff, lq, out=d).exp_()  # q p / m
        grad.addcmul_(q, r.sum(-1, keepdim=True), value=c * (1.0 - beta)).sub_(r, alpha=c * (1.0 - beta))
    elif name == "skew_reverse_kl":  # m = alpha q + (1 - alpha) p
        diff = torch.sub(lq, _log_mixture(q, p, beta, e), out=e)  # log q - log m
        rows = _row_dot(q, diff, scratch)  # KL(q || m) per token
        value = rows.sum()
        ratio = torch.exp(diff, out=d)  # q / m
        h = diff.sub_(ratio, alpha=beta)  # g, up to a constant that cancels below
        grad.addcmul_(q, h.sub_((rows - beta * _row_dot(q, ratio, scratch))[:, None]), value=c)
    elif name == "tvd":
        diff = torch.sub(q, p, out=d)
        sign = torch.sign(diff, out=e)
        value = 0.5 * torch.dot(sign.view(-1), diff.view(-1))
        grad.addcmul_(q, sign.sub_(_row_dot(q, sign, scratch)[:, None]), value=0.5 * c)
    else:
        raise LossInputError(f"no closed-form gradient for '{name}'")
    return t * t * value


def block_terms(specs: Sequence[TermSpec], coeffs: Sequence[float], student: Tensor, teacher: Tensor | None,
                labels: Tensor | None, work: Workspace, masked: bool = True,
                out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Each term's sum over one block of counted tokens, and d (coeffs . sums) / d student.

    student [n, Vs] and teacher [n, Vt] float logits (teacher None when no term needs it; read only); labels [n];
    coeffs one per spec; masked False promises that no logit is -inf (skips the floor and the +inf checks). KD terms
    compare the shared vocabulary prefix, as `divergences.score_rows` does. out: where the gradient goes [n, Vs]; it
    may be the student logits' own memory (they are read before it is written), which saves a copy of each block.
    Returns ([terms] sums, gradient [n, Vs]: out, or a workspace buffer overwritten by the next block).
    """
    dist = _Distributions(work, masked)
    vocab = min(student.shape[-1], teacher.shape[-1]) if teacher is not None else student.shape[-1]
    for spec in specs:  # every distribution before the gradient is written: out may hold the student logits
        if spec.name == "cross_entropy":
            if labels is None:
                raise LossInputError("cross_entropy needs labels: pass the token ids to score (-100 = not counted)")
            dist.get("student", student, 1.0)
        else:
            if teacher is None:
                raise LossInputError(f"{spec.name} needs teacher logits, got None")
            dist.get("student", student[:, :vocab], spec.temperature)  # rows past the shared size are padding
            dist.get("teacher", teacher[:, :vocab], spec.temperature)
    grad = (out if out is not None else work.get("grad", student)).zero_()
    sums = []
    for spec, coeff in zip(specs, coeffs, strict=True):
        if spec.name == "cross_entropy":
            lq, q = dist.get("student", student, 1.0)
            picked = lq.gather(1, labels[:, None])
            # +inf on a label the student gives no mass (floored), as F.cross_entropy gives it
            sums.append((-picked.sum()).masked_fill((picked == torch.finfo(lq.dtype).min).any(), math.inf)
                        if dist.floored(lq) else -picked.sum())
            grad.add_(q, alpha=coeff).scatter_add_(1, labels[:, None], q.new_full((q.shape[0], 1), -coeff))
        else:
            sums.append(_kd_term(spec, coeff, dist, student[:, :vocab], teacher[:, :vocab], grad[:, :vocab], work))
    return torch.stack(sums), grad


@contextmanager
def one_thread(active: bool) -> Iterator[None]:
    """torch's CPU ops on one thread inside (restored after): each thread of `RowBlocks` runs its ops alone."""
    threads = torch.get_num_threads()
    if not active or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RowBlocks:
    """Walks rows in blocks and adds up a block function's sums, on every core a CPU gives torch.

    A CPU takes blocks of ROW_BLOCK_ELEMENTS that stay in one core's cache. Splitting each op of a block over OpenMP
    threads paid a barrier per op, and on a busy machine a descheduled thread stalled every one of them (58 s for one
    1024-token loss on 2 threads against 22 s on one). Instead the rows are cut into one contiguous range per thread
    torch would use, each walked by its own Python thread with torch ops on one thread (kernels release the GIL): the
    threads meet once per call. Each thread has its own Workspace, kept for the next call. A GPU takes blocks of
    `gpu_elements` on the calling thread. The sums are added in row order, so a result depends only on the thread
    count, not on the scheduling.
    """

    def __init__(self, gpu_elements: int) -> None:
        self.gpu_elements = gpu_elements
        self._works: list[Workspace] = []

    def run(self, n_rows: int, width: int, device: torch.device, score: BlockFn) -> Tensor | None:
        """Sum of score(block, work) over blocks of rows [0, n_rows) of `width` columns (None when n_rows is 0)."""
        on_cpu = device.type == "cpu"
        step = max(1, (ROW_BLOCK_ELEMENTS if on_cpu else self.gpu_elements) // max(1, width))
        parts = min(torch.get_num_threads() if on_cpu else 1, -(-n_rows // step))
        bounds = [n_rows * i // max(1, parts) for i in range(parts + 1)]
        while len(self._works) < max(1, parts):
            self._works.append(Workspace())

        def walk(part: int) -> Tensor | None:
            total = None
            with torch.no_grad():  # grad mode is per thread: a new one starts with it on
                for start in range(bounds[part], bounds[part + 1], step):
                    sums = score(slice(start, min(start + step, bounds[part + 1])), self._works[part])
                    total = sums if total is None else total + sums
            return total

        if parts <= 1:
            with one_thread(on_cpu):
                return walk(0) if parts else None
        with one_thread(True), ThreadPoolExecutor(parts - 1) as pool:
            others = [pool.submit(walk, part) for part in range(1, parts)]
            totals = [walk(0), *(future.result() for future in others)]
        return sum(totals[1:], totals[0])
