"""Whole rounds of rows for the processes as training reads them (a mixin of DistillationTrainer).

Under several processes the training set is completed to whole rounds (one batch per process) with filler rows
(`data/rounds.py`), so accelerate never reads rows again to even out the last round; each step's micro-batches have
their fillers' labels masked before Trainer counts the step's tokens, so fillers count in neither the loss, its
denominator nor the logged terms. A trainer that remakes its micro-batches (OnPolicyTrainer samples completions)
does it in `step_batches`, before the count.
"""

from __future__ import annotations

import itertools

from torch.utils.data import IterableDataset

from lmdistill.data.rounds import drop_fillers, whole_rounds


class WholeRoundTraining:
    """Mixin before transformers.Trainer."""

    def get_train_dataloader(self):
        dataset = self.train_dataset
        if (self.accelerator.num_processes > 1 and not self.args.dataloader_drop_last and dataset is not None
                and not isinstance(dataset, IterableDataset)):
            dataset = whole_rounds(dataset, self._train_batch_size * self.accelerator.num_processes)
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
