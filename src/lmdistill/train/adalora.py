"""AdaLoRA's rank budget as training drives it (a mixin of DistillationTrainer).

peft reallocates AdaLoRA's ranks from importance scores of the adapters' gradients: `update_and_allocate(step)` after
every optimizer step, before the gradients are cleared. The stage that creates the adapters does so; later stages
load them at the ranks it settled on (peft builds them from adapter_config's rank_pattern) and keep those.

Resume: peft saves adapters cut to the rank pattern (that is what best/, final/ and a later stage load), but the
training model and its optimizer state stay full-rank, with pruned ranks masked to zero. So each checkpoint also holds
the full-rank adapters, the rank pattern and the allocator's importance averages (ADALORA_FILE), and a resumed stage
loads those instead of the cut adapters: it continues exactly where the uninterrupted run was.

AdaLoRA's orthogonality regulariser, which peft adds only to a loss the model computes itself, joins the training loss.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ADALORA_FILE = "adalora_state.pt"


def adalora_model(model: nn.Module) -> nn.Module | None:
    """The peft AdaLoraModel inside `model`, or None."""
    base = getattr(model, "base_model", None)
    return base if hasattr(base, "update_and_allocate") else None


def adalora_budget(model: nn.Module) -> nn.Module | None:
    """The peft AdaLoraModel inside `model` whose rank budget this stage allocates, or None: not AdaLoRA, or adapters
    an earlier stage already allocated (their config holds its rank_pattern)."""
    base = adalora_model(model)
    if base is None:
        return None
    return base if base.peft_config[base.trainable_adapter_name].rank_pattern is None else None


def orthogonal_penalty(adalora: nn.Module) -> torch.Tensor:
    """AdaLoRA's regulariser, as peft adds it to a model's own loss: orth_reg_weight x the mean over the adapters'
    P (lora_B) and Q (lora_A) of ||P^T P - I||_F and ||Q Q^T - I||_F. A scalar."""
    name = adalora.trainable_adapter_name
    norms = []
    for pname, p in adalora.model.named_parameters():
        if ("lora_A" in pname or "lora_B" in pname) and name in pname:
            cov = p @ p.T if "lora_A" in pname else p.T @ p  # [r, r]
            norms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    return adalora.peft_config[name].orth_reg_weight * torch.stack(norms).mean()


class AdaLoraBudget:
    """Mixin before transformers.Trainer: `_adalora` (set by the trainer, None: nothing to allocate) and
    `_adalora_reg` (the AdaLoRA model whose regulariser joins the training loss, in every stage)."""

    _adalora: nn.Module | None = None
    _adalora_reg: nn.Module | None = None

    def _with_orthogonal_penalty(self, model: nn.Module, loss: torch.Tensor, spread: int) -> torch.Tensor:
        """Training steps: `loss` (which the trainer multiplies by `spread`) plus the regulariser, split over the
        micro-batches of an optimizer step so that each step adds it once. Evaluation reports the objective alone."""
        if self._adalora_reg is None or not model.training:
            return loss
        return loss + orthogonal_penalty(self._adalora_reg) / (self.args.gradient_accumulation_steps * spread)

    def _allocate_rank_budget(self) -> None:
        """After an optimizer step that was taken (a skipped step leaves the budget as it was)."""
        if self._adalora is not None:
            self._adalora.update_and_allocate(self.state.global_step)

    def _adalora_state(self) -> dict:
        budget = self._adalora
        allocator = budget.rankallocator
        return {"adapters": {n: p.detach().cpu() for n, p in budget.model.named_parameters() if "lora_" in n},
                "rank_pattern": budget.peft_config[budget.trainable_adapter_name].rank_pattern,
                "allocator": {key: {n: t.cpu() for n, t in getattr(allocator, key).items()}
                              for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")}}

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self._adalora is not None and self.args.should_save:
            tmp = os.path.join(output_dir, f".{ADALORA_FILE}.tmp")
            torch.save(self._adalora_state(), tmp)
            os.replace(tmp, os.path.join(output_dir, ADALORA_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, ADALORA_FILE)
        if self._adalora is None or not os.path.exists(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Not Trainer's loader: it would load the adapters peft saved cut to the rank pattern into the full-rank ones.
        state = torch.load(path, map_location="cpu", weights_only=True)
        budget = self._adalora
        params = dict(budget.model.named_parameters())
        with torch.no_grad():
            for name, value in state["adapters"].items():
                params[name].copy_(value)
        budget.peft_config[budget.trainable_adapter_name].rank_pattern = state["rank_pattern"]
        for key, tensors in state["allocator"].items():
            setattr(budget.rankallocator, key, {n: t.to(params[n].device) for n, t in tensors.items()})
