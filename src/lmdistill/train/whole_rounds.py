"""Whole rounds of rows for the processes as training and evaluation read them (mixins of DistillationTrainer).

Under several processes the training and eval sets are completed to whole rounds (one batch per process) with filler
rows (`data/rounds.py`), so accelerate never reads rows again to even out the last round.

Training: each step's micro-batches have their fillers' labels masked before Trainer counts the step's tokens, so
fillers count in neither the loss, its denominator nor the logged terms. A trainer that remakes its micro-batches
(OnPolicyTrainer samples completions) does it in `step_batches`, before the count.

Evaluation: each eval batch has its fillers masked alike, and `eval_loss` is the objective's mean over every counted
eval token, each row counted once over all processes: the same number a single process gives, whatever the batch
size or process count. Trainer's own eval_loss is a mean of its batches' losses weighted by their rows, which
depends on how the rows fall into batches, and under several processes counts the last round's rows read again
(its `gather_for_metrics` drops their copies of the batch loss, not their share of it).
"""

from __future__ import annotations

import itertools

import torch
from torch.utils.data import IterableDataset

from lmdistill.data.rounds import WholeRounds, drop_fillers, whole_rounds


def _in_whole_rounds(trainer, dataset, batch_size: int):
    """`dataset` completed to whole rounds of `batch_size` rows per process; itself under one process, when the
    last incomplete batch is dropped anyway, or when it has no length."""
    if (trainer.accelerator.num_processes > 1 and not trainer.args.dataloader_drop_last and dataset is not None
            and not isinstance(dataset, IterableDataset)):
        return whole_rounds(dataset, batch_size * trainer.accelerator.num_processes)
    return dataset


class WholeRoundTraining:
    """Mixin before transformers.Trainer."""

    def get_train_dataloader(self):
        dataset = _in_whole_rounds(self, self.train_dataset, self._train_batch_size)
        if dataset is self.train_dataset:
            return super().get_train_dataloader()
        return self._get_dataloader(dataset=dataset, description="Training", batch_size=self._train_batch_size,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's: one optimizer step's micro-batches and the tokens they count over every process, counted on the
        micro-batches as they train (`step_batches`)."""
        batches = self.step_batches(list(itertools.islice(epoch_iterator, num_batches)))
        return batches, self._get_num_items_in_batch(batches, device)

    def step_batches(self, batches: list[dict]) -> list[dict]:
        """The micro-batches as read -> as trained: here their fillers masked."""
        return [drop_fillers(batch) for batch in batches]


class WholeRoundEvaluation:
    """Mixin before transformers.Trainer."""

    # (loss, token weight) of each eval batch on this process, while evaluation_loop runs.
    _eval_parts: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def get_eval_dataloader(self, eval_dataset=None):
        key = eval_dataset if isinstance(eval_dataset, str) else "eval"
        dataset = self.eval_dataset[key] if isinstance(eval_dataset, str) else (
            self.eval_dataset if eval_dataset is None else eval_dataset)
        filled = _in_whole_rounds(self, dataset, self.args.eval_batch_size)
        kept = self.args.dataloader_persistent_workers and key in getattr(self, "_eval_dataloaders", {})
        if filled is dataset or kept:  # Trainer's own loader, or the one it keeps for its persistent workers
            return super().get_eval_dataloader(eval_dataset)
        return self._get_dataloader(dataset=filled, description="Evaluation", batch_size=self.args.eval_batch_size,
                                    sampler_fn=self._get_eval_sampler, dataloader_key=key)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = drop_fillers(inputs)
        # The token count the loss divides by (over every process when it averages over them), as Trainer counts it;
        # loss * count / spread is then this process's sum over its own counted tokens.
        count = self._get_num_items_in_batch([inputs], self.args.device)
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        if loss is not None and count is not None and self._eval_parts is not None:
            spread = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            self._eval_parts.append((loss.detach().float(), torch.as_tensor(count, device=loss.device) / spread))
        return loss, logits, labels

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_parts = []
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
        finally:
            parts, self._eval_parts = self._eval_parts, None
        if parts:
            losses, weights = (self.accelerator.gather(torch.stack(column)) for column in zip(*parts))
            if (loss := _token_mean(losses, weights, self.args.logging_nan_inf_filter)) is not None:
                output.metrics[f"{metric_key_prefix}_loss"] = loss
        if isinstance(dataset := getattr(dataloader, "dataset", None), WholeRounds):
            output = output._replace(num_samples=dataset.rows)  # the rows evaluated, not the fillers
        return output


def _token_mean(losses: torch.Tensor, weights: torch.Tensor, drop_nonfinite: bool) -> float | None:
    """Σ loss * weight / Σ weight over the batches that counted a token (losses, weights: [n], one per batch and
    process); the non-finite ones left out when `drop_nonfinite` and some are finite (as Trainer's eval_loss does).
    None when no batch counted a token."""
    counted = weights > 0
    losses, weights = losses[counted], weights[counted]
    finite = torch.isfinite(losses)
    if drop_nonfinite and finite.any():
        losses, weights = losses[finite], weights[finite]
    if not len(losses):
        return None
    return float((losses.double() * weights.double()).sum() / weights.double().sum())
