"""Plain float64 references for the loss tests, written from the definitions (softmax, then log, then sum),
independent of lmdistill's code."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per token for probability tensors [..., V]; 0 log 0 = 0 (tokens a gives no mass add nothing)."""
    keep = a > 0
    # Masked entries read 1 before the log, so no -inf (nor a NaN gradient) comes from the branch where() drops.
    a_kept, b_kept = torch.where(keep, a, 1.0), torch.where(keep, b, 1.0)
    return torch.where(keep, a * (a_kept.log() - b_kept.log()), 0.0).sum(-1)


def per_token(name: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float, **params) -> torch.Tensor:
    """T^2 * divergence per position, [...], float64. Vocabularies are cut to the shared size."""
    vocab = min(student.shape[-1], teacher.shape[-1])
    q = torch.softmax(student[..., :vocab].double() / temperature, -1)
    p = torch.softmax(teacher[..., :vocab].double() / temperature, -1)
    if name == "forward_kl":
        value = _kl(p, q)
    elif name == "reverse_kl":
        value = _kl(q, p)
    elif name == "jsd":
        beta = params["beta"]
        m = beta * p + (1 - beta) * q
        value = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    elif name == "skew_kl":
        a = params["alpha"]
        value = _kl(p, a * p + (1 - a) * q)
    elif name == "skew_reverse_kl":
        a = params["alpha"]
        value = _kl(q, a * q + (1 - a) * p)
    elif name == "tvd":
        value = 0.5 * (p - q).abs().sum(-1)
    else:
        raise KeyError(name)
    return temperature**2 * value


def reference_loss(name: str, student, teacher, labels, temperature: float = 1.0, reduction: str = "mean",
                   **params) -> torch.Tensor:
    """Mean (or sum) over positions whose label is not -100."""
    values = per_token(name, student, teacher, temperature, **params)
    mask = torch.ones_like(values, dtype=torch.bool) if labels is None else labels != -100
    total = values[mask].sum()
    return total if reduction == "sum" else total / max(int(mask.sum()), 1)


def reference_ce(student, labels) -> torch.Tensor:
    logp = torch.log_softmax(student.double(), -1)
    mask = labels != -100
    picked = logp[mask].gather(-1, labels[mask][:, None]).squeeze(-1)
    return -picked.sum() / max(int(mask.sum()), 1)


def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean"):
    """TRL GKDTrainer.generalized_jsd_loss, written out (trl is not imported)."""
    F = torch.nn.functional
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        beta = torch.tensor(beta, dtype=student_log_probs.dtype)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]), dim=0)
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if reduction == "batchmean":
        return jsd.sum() / mask.sum() if labels is not None else jsd.sum() / (jsd.size(0) * jsd.size(1))
    return jsd.sum()


def random_case(shape: tuple[int, ...], vocab: int, seed: int, masked: float = 0.3, scale: float = 3.0):
    """Random student/teacher logits [*shape, V] and labels [*shape] with a random share of -100."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, vocab, generator=g) * scale
    teacher = torch.randn(*shape, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < masked] = -100
    return student, teacher, labels


class NewTensorsShaped(TorchDispatchMode):
    """Counts the ops that allocate a new tensor of a given shape (views, in-place and out= ops write no new one)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        writes_out = func._overloadname == "out" or "out" in (kwargs or {})
        writes_in_place = func._schema.name.endswith("_") or writes_out or func.is_view
        if not writes_in_place and isinstance(out, torch.Tensor) and out.shape == self.shape:
            self.count += 1
        return out
