"""The contrastive term gathers its negatives across processes: two gloo processes holding 3 and 2 examples give the
value and the projection gradients of one process holding all 5 (after DDP's gradient average and the trainer's
`spread`), also with one example on a process, which alone would have no negative."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmdistill.losses import ContrastiveDistiller
from lmdistill.train.hidden_terms import global_share

ROWS = (3, 2)  # examples per process (unequal: the gather pads)
T, DS, DT = 5, 16, 32


def _data():
    g = torch.Generator().manual_seed(0)
    n = sum(ROWS)
    student, teacher = torch.randn(n, T, DS, generator=g), torch.randn(n, T, DT, generator=g)
    mask = (torch.rand(n, T, generator=g) < 0.7).long()
    mask[0] = 0  # an example with no counted token takes no part
    mask[1, 0] = 1
    return student, teacher, mask


def _module():
    torch.manual_seed(0)
    return ContrastiveDistiller(DS, DT, proj_dim=8, temperature=0.5)


def _grads(module):
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher, mask = _data()
        mine = slice(sum(ROWS[:rank]), sum(ROWS[: rank + 1]))
        num_items = mask.sum()  # the tokens of every process, as Trainer counts them with average_tokens_across_devices
        module = _module()
        share = global_share(module(student[mine], teacher[mine], mask[mine], num_items=num_items), world, world)
        (share * world).backward()  # the trainer's `spread` x the loss
        grads = _grads(module)
        dist.all_reduce(grads)  # DDP: the mean over processes
        grads /= world
        value = share.detach().clone()
        dist.all_reduce(value)  # the global loss: the sum of the shares
        if rank == 0:
            torch.save({"value": value, "grads": grads}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_two_processes_equal_one_process_with_every_example(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(len(ROWS), str(tmp_path / "init"), out), nprocs=len(ROWS), start_method="fork")
    got = torch.load(out)
    student, teacher, mask = _data()
    module = _module()
    whole = module(student, teacher, mask, num_items=mask.sum())
    whole.backward()
    torch.testing.assert_close(got["value"], whole.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["grads"], _grads(module), rtol=1e-4, atol=1e-6)
    assert whole > 0


def test_token_weighted_info_nce_against_a_float64_reference():
    """Pooling over the counted tokens, each example weighted by its counted tokens, empty examples left out."""
    student, teacher, mask = _data()
    module = _module()
    got = module(student, teacher, mask)
    keep = mask.sum(1) > 0
    m = mask[keep].double()[..., None]

    def embed(states, proj):
        pooled = (states[keep].double() * m).sum(1) / m.sum(1)
        z = pooled @ proj.weight.double().T + proj.bias.double()
        return z / z.norm(dim=-1, keepdim=True)

    logits = embed(student, module.student_proj) @ embed(teacher, module.teacher_proj).T / 0.5
    w = mask[keep].sum(1).double()
    per_row = 0.5 * (logits.logsumexp(1) + logits.logsumexp(0)) - logits.diag()
    torch.testing.assert_close(got.double(), (per_row * w).sum() / w.sum(), rtol=1e-5, atol=1e-6)
    assert module(student[1:2], teacher[1:2], mask[1:2]) == 0  # one example alone has no negative
