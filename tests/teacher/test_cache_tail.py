"""The trainer's cache lookup hands over the tail mass the cache stored, laid out like the batch's labels."""

import torch

from lmdistill.config import config_from_dict
from lmdistill.data.collate import DistillCollator
from lmdistill.data.mixture import ID_STRIDE
from lmdistill.teacher.stage import open_stage_cache
from lmdistill.train.prepare import prepare


def test_lookup_returns_the_stored_tail_at_counted_tokens(teacher_config, topk_cache):
    config = config_from_dict(teacher_config(teacher_cache={"path": str(topk_cache)}))
    prep = prepare(config, load_teacher=False)
    names = list(prep.sources)
    lookup, _, _ = open_stage_cache(config, prep, config.stages[0], names, 10**6)
    chosen = [("domain", 3), ("general", 0), ("domain", 15)]
    examples = [prep.sources[key][position] for key, position in chosen]
    batch = DistillCollator(prep.tokenizer.pad_token_id)(examples)
    target = batch["labels"][:, 1:]  # [B, T'] after the causal shift, padded
    example_ids = torch.tensor([names.index(key) * ID_STRIDE + ex["row_id"] for (key, _), ex in zip(chosen, examples)])
    ids, logprobs, tail = lookup.lookup({**batch, "example_id": example_ids}, target)
    assert tail.shape == target.shape and tail.dtype == torch.float32
    counted = target != -100
    assert (tail[~counted] == 0).all()
    for b, (key, position) in enumerate(chosen):
        row_ids, row_lps, row_tail = lookup.cache.example(key, position)
        assert torch.equal(ids[b][counted[b]], row_ids)
        assert torch.equal(tail[b][counted[b]], row_tail)  # the stored tail, not 1 - sum(kept)
        assert (row_tail > 0).all() and not torch.equal(row_tail, 1 - row_lps.float().exp().sum(-1))
