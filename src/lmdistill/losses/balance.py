"""Balancing loss terms so that no term's gradient swamps the others.

`none`        total = sum_i w_i L_i.
`loss_scale`  total = sum_i w_i L_i / m_i, m_i an exponential moving average of |L_i| (updated before use,
              seeded with the first value): each term contributes about w_i, whatever its units.
`gradnorm`    total = sum_i g_i w_i L_i, with multipliers g_i adapted each step so that the weighted gradient
              norms G_i = g_i w_i ||d L_i / d W|| on the shared parameters W meet a common target: their mean,
              times (relative inverse training rate)^alpha as in GradNorm (Chen et al. 2018; alpha = 0 asks for
              equal norms). GradNorm's objective |G_i - target_i| is followed in log space,
              log g_i -= lr * (log G_i - log target_i), which is scale-free; the g_i are renormalised to sum to the
              number of terms. Costs one extra backward per term to the shared parameters (keep them small:
              e.g. the student's last layer).

Under several processes, `average` (a mean over the processes of a vector of statistics) makes every process see the
same magnitudes and gradient norms, so all keep the same state and weigh the terms alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from lmdistill.losses.errors import LossConfigError

BALANCE_MODES = ("none", "loss_scale", "gradnorm")


class LossBalancer:
    """Combines named loss terms into the total to backpropagate; keeps its running state (see state_dict)."""

    def __init__(self, mode: str = "none", ema: float = 0.9, alpha: float = 0.0, lr: float = 0.1,
                 eps: float = 1e-8) -> None:
        if mode not in BALANCE_MODES:
            raise LossConfigError(f"balance mode must be one of {BALANCE_MODES}, got {mode!r}")
        if not 0.0 <= ema < 1.0:
            raise LossConfigError(f"balance ema must be in [0, 1), got {ema}")
        if alpha < 0 or lr <= 0:
            raise LossConfigError(f"gradnorm needs alpha >= 0 and lr > 0, got alpha={alpha}, lr={lr}")
        self.mode, self.ema, self.alpha, self.lr, self.eps = mode, ema, alpha, lr, eps
        self.scales: dict[str, float] = {}       # loss_scale: running mean |L_i|
        self.multipliers: dict[str, float] = {}  # gradnorm: g_i
        self.initial: dict[str, float] = {}      # gradnorm: L_i at the first step (training rates)

    def combine(self, terms: Mapping[str, Tensor], weights: Mapping[str, float],
                shared_params: Iterable[Tensor] | None = None,
                average: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """terms: name -> scalar loss (in the graph); weights: name -> w_i; average: [n] -> [n], the mean over the
        processes (None: one process). Returns the scalar total."""
        missing = sorted(set(terms) - set(weights))
        if missing:
            raise LossConfigError(f"no weight given for loss term(s) {', '.join(missing)}")
        average = average or (lambda stats: stats)
        if self.mode == "loss_scale":
            factors = self._loss_scale(terms, average)
        elif self.mode == "gradnorm":
            if shared_params is None:
                raise LossConfigError("balance mode 'gradnorm' needs shared_params (e.g. the student's last layer)")
            factors = self._gradnorm(terms, weights, list(shared_params), average)
        else:
            factors = {name: 1.0 for name in terms}
        return torch.stack([weights[name] * factors[name] * value for name, value in terms.items()]).sum()

    def _loss_scale(self, terms: Mapping[str, Tensor], average: Callable[[Tensor], Tensor]) -> dict[str, float]:
        magnitudes = _stats(average, [value.detach().abs() for value in terms.values()], _device(terms))
        for name, magnitude in zip(terms, magnitudes):
            previous = self.scales.get(name)
            self.scales[name] = magnitude if previous is None else self.ema * previous + (1 - self.ema) * magnitude
        return {name: 1.0 / (self.scales[name] + self.eps) for name in terms}

    def gradient_norms(self, terms: Mapping[str, Tensor], params: list[Tensor]) -> dict[str, float]:
        """||d L_i / d params|| for each term (0 when a term does not reach the parameters)."""
        norms = {}
        for name, value in terms.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            norms[name] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
        return norms

    def _gradnorm(self, terms: Mapping[str, Tensor], weights: Mapping[str, float], params: list[Tensor],
                  average: Callable[[Tensor], Tensor]) -> dict[str, float]:
        local = self.gradient_norms(terms, params)
        stats = _stats(average, [local[n] for n in terms] + [v.detach().abs() for v in terms.values()], _device(terms))
        norms, values = dict(zip(terms, stats[: len(terms)])), dict(zip(terms, stats[len(terms):]))
        active = [n for n in terms if norms[n] > 0 and weights[n] > 0]  # a term off W cannot be balanced on W
        for name in active:
            self.multipliers.setdefault(name, 1.0)
            self.initial.setdefault(name, max(values[name], self.eps))
        if len(active) > 1:
            g = {n: self.multipliers[n] * weights[n] * norms[n] for n in active}
            mean_norm = sum(g.values()) / len(active)
            rates = {n: values[n] / self.initial[n] for n in active}
            mean_rate = sum(rates.values()) / len(active)
            for n in active:
                target = mean_norm * (rates[n] / mean_rate) ** self.alpha if mean_rate > 0 else mean_norm
                target = max(target, self.eps)  # a term already at 0 would ask for a zero norm
                self.multipliers[n] *= math.exp(-self.lr * math.log(g[n] / target))
            total = sum(self.multipliers[n] for n in active)
            for n in active:
                self.multipliers[n] *= len(active) / total
        return {name: self.multipliers.get(name, 1.0) for name in terms}

    def state_dict(self) -> dict:
        return {"mode": self.mode, "scales": dict(self.scales), "multipliers": dict(self.multipliers),
                "initial": dict(self.initial)}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("mode") != self.mode:
            raise LossConfigError(f"balancer state was saved in mode {state.get('mode')!r}, this run uses "
                                  f"{self.mode!r}; keep the mode when resuming")
        self.scales, self.multipliers = dict(state["scales"]), dict(state["multipliers"])
        self.initial = dict(state["initial"])


def _stats(average: Callable[[Tensor], Tensor], values: list[Tensor | float], device: torch.device) -> list[float]:
    """Scalar statistics -> floats, averaged over the processes in one call (on the terms' device, as a collective
    needs)."""
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()).to(device) for v in values])
    return [float(x) for x in average(stacked)]


def _device(terms: Mapping[str, Tensor]) -> torch.device:
    return next(iter(terms.values())).device
