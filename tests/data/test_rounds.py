"""Filler rows that complete the processes' last round: marked in the dataset, carried by the collator, and masked
(labels -100) before the trainer counts tokens."""

import torch

from lmdistill.data.collate import DistillCollator
from lmdistill.data.rounds import FILLER, drop_fillers, whole_rounds


def _rows(n):
    return [{"input_ids": [5 + i, 6, 7], "labels": [-100, 6, 7], "example_id": i} for i in range(n)]


def test_the_last_round_is_completed_with_marked_rows_from_the_start():
    rows = _rows(5)
    assert whole_rounds(rows, 5) is rows  # whole rounds already: read as it is
    padded = whole_rounds(rows, 4)
    assert len(padded) == 8
    assert [padded[i] for i in range(5)] == rows
    assert [padded[i]["example_id"] for i in range(5, 8)] == [0, 1, 2]
    assert all(padded[i][FILLER] for i in range(5, 8))
    assert len(whole_rounds(_rows(1), 4)) == 4  # fewer rows than a round: the one row fills it


def test_fillers_count_no_label_and_leave_the_batch_unmarked():
    collate = DistillCollator(0)
    padded = whole_rounds(_rows(3), 2)
    assert FILLER not in collate([padded[0], padded[1]])  # no filler: the batch is as before
    batch = collate([padded[2], padded[3]])
    assert batch[FILLER].tolist() == [False, True]
    labels = batch["labels"].clone()
    out = drop_fillers(batch)
    assert FILLER not in out
    assert torch.equal(out["labels"][0], labels[0]) and (out["labels"][1] == -100).all()
    assert torch.equal(out["input_ids"], batch["input_ids"])  # the row still runs: every process takes the same steps


def test_a_batch_made_from_the_read_rows_masks_their_fillers():
    """An on-policy micro-batch sampled for the read rows' prompts: row i is read row i."""
    collate = DistillCollator(0)
    padded = whole_rounds(_rows(3), 2)
    read = collate([padded[3], padded[2]])
    sampled = {"input_ids": torch.ones(2, 6, dtype=torch.long), "labels": torch.ones(2, 6, dtype=torch.long)}
    out = drop_fillers(sampled, read)
    assert FILLER not in read and FILLER not in out
    assert (out["labels"][0] == -100).all() and (out["labels"][1] == 1).all()


def test_a_fillers_aligned_pairs_with_a_teacher_are_dropped():
    """Cross-tokenizer batches align student and teacher positions in pairs (-1: none): a filler's count none."""
    batch = {"labels": torch.ones(2, 4, dtype=torch.long), "pairs": torch.ones(2, 3, 2, dtype=torch.long),
             FILLER: torch.tensor([True, False])}
    out = drop_fillers(batch)
    assert (out["pairs"][0] == -1).all() and (out["pairs"][1] == 1).all() and (out["labels"][0] == -100).all()
