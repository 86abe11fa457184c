"""DistillationTrainer: transformers.Trainer plus a frozen teacher and a distillation objective.

Only `compute_loss` and `log` are overridden, and `create_optimizer` is extended: the projections of hidden-state
terms join the optimiser, and since they live outside the model, their gradients are averaged over the processes,
clipped and cleared here as Trainer does for the model's; a step whose loss was non-finite is skipped. The projections
are saved beside each checkpoint (`_save` / `_load_from_checkpoint`). The student's and the teacher's forward passes
(logits only at scored positions, or the fused loss's head inputs) are `forward.py`'s. A loss balancer acts on
training steps only (`balancing.py`). An out-of-memory error names the settings that lower the memory (`memory.py`).
Under several processes no row trains or is evaluated twice to even out the last round, and eval_loss is the
objective's mean over every eval token (`whole_rounds.py`). Accumulation, precision, optimizers, schedules, clipping
of the model, checkpoints, resume and logging are Trainer's own; AdaLoRA's rank budget is allocated after each
optimizer step and checkpointed for resume, its regulariser added (`adalora.py`).

Normalisation: every logit term is a sum over counted tokens divided by `num_items_in_batch`, which Trainer counts over
the whole accumulated batch (after the causal shift), so N micro-batches give the same update as one batch N times
larger. We therefore tell Trainer the loss is already scaled for accumulation. The hidden-state terms count the same
tokens and are normalised alike (`hidden_terms.py`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from lmdistill.errors import TrainingError
from lmdistill.losses import DistillObjective
from lmdistill.train.adalora import AdaLoraBudget, adalora_budget, adalora_model
from lmdistill.train.balancing import BalancedTraining
from lmdistill.train.deepspeed_teacher import deepspeed_teachers
from lmdistill.train.forward import ForwardPasses
from lmdistill.train.heads import fused_blocker, head_rows, logit_scale, output_layer, softcap
from lmdistill.train.hidden_terms import AuxTerms, hidden_terms
from lmdistill.train.memory import out_of_memory_hint
from lmdistill.train.whole_rounds import WholeRoundEvaluation, WholeRoundTraining

log = logging.getLogger(__name__)

MAX_NONFINITE_IN_A_ROW = 3
# Learned projections of the hidden-state terms, beside the student's weights in each checkpoint.
AUX_FILE = "aux_terms.safetensors"


class TeacherCacheLookup(Protocol):
    """A top-k teacher: ids/log-probs and the tail mass at a batch's counted tokens. A cache looks the batch's
    example ids up (lmdistill.teacher.reader.CacheLookup); a served teacher scores the batch's tokens, whatever they
    are (lmdistill.teacher.served_scoring.ServedScorer, which also samples: `completions`)."""

    cache_temperature: float
    tail: str
    scores_any_tokens: bool  # False: only the rows it was built from (a cache)

    def lookup(self, batch: dict[str, torch.Tensor],
               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class CrossVocabTerms(Protocol):
    """Logit terms against a teacher with another vocabulary, met at aligned positions: live
    (train/cross_tokenizer.py) or from a teacher cache (train/cross_cache.py)."""

    weights: dict[str, float]

    def terms(self, student_logits: torch.Tensor, inputs: dict[str, torch.Tensor],
              num_items) -> dict[str, torch.Tensor]: ...


class _StepEnd(TrainerCallback):
    """Runs the trainer's own end-of-step bookkeeping, also when an fp16 scaler skipped the optimizer step."""

    def __init__(self, trainer: "DistillationTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_step()


class DistillationTrainer(BalancedTraining, AdaLoraBudget, WholeRoundTraining, WholeRoundEvaluation, Trainer):
    def __init__(self, *args, objective: DistillObjective, teacher: nn.Module | None = None,
                 aux: AuxTerms | None = None, balancer=None, task_type: str = "causal",
                 shared_vocab: int | None = None, fused: bool = False, teacher_cache: TeacherCacheLookup | None = None,
                 cross_vocab: CrossVocabTerms | None = None,
                 teacher_shard: Sequence[str] = ("auto",), **kwargs):
        super().__init__(*args, **kwargs)
        if teacher is not None and self.is_deepspeed_enabled:
            # Under ZeRO-3 each teacher whose `shard` setting (teacher_shard: one per teacher) allows it gets its own
            # inference engine, partitioned like the student.
            teacher = deepspeed_teachers(teacher, teacher_shard, self.accelerator)
        if objective.needs_teacher and teacher is None and teacher_cache is None:
            raise TrainingError("the stage's losses need a teacher, but neither a live teacher nor a cache was given")
        if fused and (reason := fused_blocker(self.model, teacher, self.args.device, self.is_fsdp_enabled)):
            raise TrainingError(reason)
        self.teacher = teacher
        self.teacher_cache = teacher_cache
        self.cross_vocab = cross_vocab
        self.objective = objective
        self.aux = aux or AuxTerms()
        self.balancer = balancer  # None: the plain weighted sum
        self.task_type = task_type
        self.shared_vocab = shared_vocab
        self.fused = fused
        # The step's forward passes; the teacher's logits only when the logit terms score the live teacher (no cache).
        self.forward_passes = ForwardPasses(
            teacher, teacher_logits=teacher is not None and objective.needs_teacher and teacher_cache is None,
            hidden=self.aux.needs_hidden, attentions=self.aux.needs_attentions, task_type=task_type, fused=fused,
            cross_vocab=cross_vocab is not None, shared_vocab=shared_vocab)
        # Callables(folder) that write extra state into each checkpoint (e.g. the EMA teacher), see _save_checkpoint.
        self.checkpoint_writers: list = []
        # Our compute_loss divides by the token count of the whole accumulated batch itself.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._loss_shifts_labels = task_type == "causal"
        # Per-term sums and counts stay on the device until log(): reading them each step would stop the host.
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_counts: dict[str, torch.Tensor] = {}
        self._nonfinite_in_a_row = 0
        self._skip_optimizer_step = False
        self._nonfinite_terms: set[str] = set()
        # The projections of hidden-state terms live outside the model, so Trainer neither syncs, clips nor clears
        # their gradients: training_step, the optimizer step and a callback do it for them.
        self._projections = [p for module in (self.aux.feature, self.aux.contrastive) if module is not None
                             for p in module.parameters() if p.requires_grad]
        if self._projections and self.is_deepspeed_enabled:
            raise TrainingError("the feature / contrastive terms learn projections outside the student, which "
                                "DeepSpeed's engine neither syncs nor checkpoints: drop those terms for DeepSpeed runs, "
                                "or train with DDP / FSDP")
        self._adalora = adalora_budget(self.model)  # AdaLoRA's rank budget, allocated after each optimizer step
        self._adalora_reg = adalora_model(self.model)
        self.add_callback(_StepEnd(self))

    # ------------------------------------------------------------------ optimiser: trainable projections + skip guard
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        projections = self._projections
        if projections:
            # Projections learned with the student (feature/contrastive widths differ): same lr, no weight decay.
            optimizer.add_param_group({"params": projections, "weight_decay": 0.0})
        step = optimizer.step

        def guarded_step(*a, **kw):
            if self._step_is_skipped():
                optimizer.zero_grad(set_to_none=True)
                self._end_balancer_step(skipped=True)
                return None
            if projections and self.args.max_grad_norm > 0:
                # Trainer clips the model's gradients only; the projections get the same limit on their own norm.
                torch.nn.utils.clip_grad_norm_(projections, self.args.max_grad_norm)
            result = step(*a, **kw)
            self._allocate_rank_budget()  # scored from this step's gradients: before they are cleared
            return result

        optimizer.step = guarded_step
        return optimizer

    def _end_step(self) -> None:
        # Trainer clears the model's gradients after each step; the projections' would otherwise add up.
        for p in self._projections:
            p.grad = None
        self._skip_optimizer_step = False
        self._nonfinite_terms.clear()
        self._end_balancer_step(skipped=False)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with out_of_memory_hint("the training step (student forward, loss, backward)"):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self._projections and self.accelerator.num_processes > 1 and self.accelerator.sync_gradients:
            # DDP averaged the student's gradients in this backward; the projections are averaged here alike, on the
            # micro-batch every process syncs on, so that the fp16 scaler's inf check agrees on every process.
            for p in self._projections:
                p.grad = self.accelerator.reduce(p.grad if p.grad is not None else torch.zeros_like(p), "mean")
        return loss

    # ------------------------------------------------------------------ projections saved with every checkpoint
    def _aux_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({name: module for name in ("feature", "contrastive")
                              if (module := getattr(self.aux, name)) is not None and any(True for _ in module.parameters())})

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        modules = self._aux_modules()
        if len(modules) and self.args.should_save:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in modules.state_dict().items()},
                      os.path.join(output_dir or self.args.output_dir, AUX_FILE))

    def _save_checkpoint(self, model, trial) -> None:
        # Written before Trainer's trainer_state.json, which marks a checkpoint complete for resume: a run killed
        # in between resumes from a checkpoint that holds everything (rotation has already removed the older ones).
        if self.args.should_save and self.checkpoint_writers:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            for write in self.checkpoint_writers:
                write(folder)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, AUX_FILE)
        modules = self._aux_modules()
        if len(modules) and os.path.exists(path):
            from safetensors.torch import load_file

            modules.load_state_dict(load_file(path))

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        # Causal LMs: position t predicts label t+1 (one shift, here); seq2seq decoders are aligned already.
        target = labels[:, 1:] if self.task_type == "causal" else labels
        passes = self.forward_passes
        scored = passes.scored(model, target, return_outputs)
        student_out = passes.student(model, inputs, labels, scored)
        with out_of_memory_hint("the teacher's forward pass"):
            teacher_out = passes.teacher_outputs(inputs, labels, scored) if passes.runs_teacher else None

        def aligned(per_position: torch.Tensor) -> torch.Tensor:
            return per_position[:, :-1] if self.task_type == "causal" else per_position

        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(labels.device)

        if self.fused:
            # The heads' rows cut to the shared vocabulary: the same cut as the logits' in the branch below.
            s_weight, s_bias = head_rows(output_layer(model), self.shared_vocab)
            s_hidden = aligned(student_out.head_input)
            if self.teacher_cache is not None and self.objective.needs_teacher:
                ids, logprobs, tail = self.teacher_cache.lookup(inputs, target)
                out = self.objective.fused_cached(
                    s_hidden, s_weight, s_bias, ids, logprobs, target, num_items=num_items_in_batch,
                    cache_temperature=self.teacher_cache.cache_temperature, tail=self.teacher_cache.tail,
                    teacher_tail=tail, student_softcap=softcap(model), student_logit_scale=logit_scale(model))
            else:
                out = self.objective.fused(
                    s_hidden, s_weight, s_bias, labels=target, num_items=num_items_in_batch,
                    student_softcap=softcap(model), student_logit_scale=logit_scale(model),
                    **passes.fused_teacher(teacher_out, aligned))
        else:
            # With scored positions the forward passes returned those rows' logits [n, V]: the rest follow them.
            def rows(logits: torch.Tensor) -> torch.Tensor:
                return (logits if scored is not None else aligned(logits))[..., : self.shared_vocab]

            def kept(per_label: torch.Tensor | None) -> torch.Tensor | None:
                return per_label[scored[:, :-1]] if scored is not None and per_label is not None else per_label

            s_logits = rows(student_out.logits)
            if self.teacher_cache is not None and self.objective.needs_teacher:
                ids, logprobs, tail = map(kept, self.teacher_cache.lookup(inputs, target))
                out = self.objective.cached(s_logits, ids, logprobs, kept(target), num_items=num_items_in_batch,
                                            cache_temperature=self.teacher_cache.cache_temperature,
                                            tail=self.teacher_cache.tail, teacher_tail=tail)
            else:
                t_logits = rows(teacher_out.logits) if passes.teacher_logits else None
                out = self.objective(s_logits, t_logits, kept(target), num_items=num_items_in_batch)

        # Every term divides by the tokens of all processes (num_items), so each process holds its share of the
        # global mean; DDP then averages gradients over the processes, which `spread` undoes.
        spread = self.accelerator.num_processes if (
            self.args.average_tokens_across_devices and num_items_in_batch is not None) else 1
        terms = dict(out.terms)
        weights = {term.name: term.weight for term in self.objective.terms}
        if self.cross_vocab is not None:
            # The teacher on its own tokens, met at aligned positions; a sum over num_items like the terms above.
            terms.update(self.cross_vocab.terms(student_out.logits, inputs, num_items_in_batch))
            weights.update(self.cross_vocab.weights)
        terms.update(hidden_terms(self.aux, self.task_type, student_out, teacher_out, inputs, target,
                                  num_items_in_batch, spread, self.accelerator.num_processes))
        weights.update(self.aux.weights)
        total = self._with_orthogonal_penalty(model, self._combine(model, terms, weights), spread)

        if model.training:
            total = self._guard_nonfinite(model, total, terms)
            self._record({name: value * spread for name, value in terms.items()}, weights)
        return (total * spread, student_out) if return_outputs else total * spread

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with out_of_memory_hint("evaluation (student forward, loss)"):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)

    # ------------------------------------------------------------------ non-finite guard and per-term logging
    def _guard_nonfinite(self, model: nn.Module, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        # One host sync for all terms and the total, not one per term.
        finite = torch.isfinite(torch.stack([v.detach().float().sum() for v in (*terms.values(), total)]))
        if finite.all():
            return total
        bad = [name for name, ok in zip(terms, finite.tolist()) if not ok]
        self._nonfinite_terms.update(bad or ["total"])
        log.warning("step %d: non-finite loss term(s) %s; skipping this step", self.state.global_step,
                    ", ".join(bad) or "total")
        self._skip_optimizer_step = True
        # Zero through every trainable parameter: the backward runs its DDP gradient sync like the other processes'
        # (finite zeros, so an fp16 scaler does not skip the step behind the guard's back).
        return sum((p * 0).sum() for p in model.parameters() if p.requires_grad)

    def _step_is_skipped(self) -> bool:
        """Whether this optimizer step is skipped: a micro-batch of it had a non-finite loss on any process (all
        processes decide alike, as they share gradients). MAX_NONFINITE_IN_A_ROW skipped steps stop the run."""
        skip = self._skip_optimizer_step
        if self.accelerator.num_processes > 1:
            skip = bool(self.accelerator.reduce(torch.tensor(float(skip), device=self.args.device), "sum") > 0)
        names = ", ".join(sorted(self._nonfinite_terms)) or "(on another process)"
        self._skip_optimizer_step = False
        self._nonfinite_terms.clear()
        self._nonfinite_in_a_row = self._nonfinite_in_a_row + 1 if skip else 0
        if self._nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            raise TrainingError(
                f"loss term(s) {names} were NaN/inf {self._nonfinite_in_a_row} steps in a row (step "
                f"{self.state.global_step}); lower the learning rate, check the data, or use float32/bf16 instead of fp16")
        return skip

    def _record(self, terms: dict[str, torch.Tensor], weights: dict[str, float]) -> None:
        for name, value in terms.items():
            value = value.detach().float().sum()
            finite = torch.isfinite(value)
            self._term_sums[name] = self._term_sums.get(name, 0.0) + torch.where(finite, value, 0.0)
            self._term_counts[name] = self._term_counts.get(name, 0) + finite.long()
        self._weights = weights

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_counts:
            ga = max(1, self.args.gradient_accumulation_steps)
            for name, total in self._term_sums.items():
                count = int(self._term_counts[name])
                if not count:  # non-finite at every step since the last log
                    continue
                # Terms are recorded per micro-batch as parts of an accumulated mean: rescale to a per-step value.
                logs[f"loss/{name}"] = round(float(total) * ga / count, 6)
                logs[f"weight/{name}"] = self._weights.get(name, 0.0)
            self._term_sums.clear()
            self._term_counts.clear()
        super().log(logs, start_time)
