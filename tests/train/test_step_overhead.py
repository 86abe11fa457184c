"""Per-step overhead of DistillationTrainer.compute_loss: the per-term logging and the non-finite guard read one value
back to the host per micro-batch (on a GPU each read waits for the device), not one or two per term."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.trainer import DistillationTrainer


class _HostReads(TorchDispatchMode):
    """Counts tensor -> Python number conversions (bool(), float(), .item(), .tolist())."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_compute_loss_reads_one_value_back_per_step_and_logs_the_terms(student_dir, teacher_dir, tmp_path):
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False,
                             save_strategy="no")
    terms = [LossTerm("forward_kl", 0.4, {}), LossTerm("reverse_kl", 0.3, {}), LossTerm("cross_entropy", 0.3, {})]
    trainer = DistillationTrainer(model=student, args=args, data_collator=DistillCollator(0), teacher=teacher,
                                  objective=DistillObjective(terms, temperature=2.0))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(5, 300, (12,), generator=g).tolist()), "labels": ids} for _ in range(4)]
    batch = DistillCollator(0)(rows)
    student.train()
    losses = []
    with _HostReads() as forward_reads:  # a model forward's own (transformers' mask checks)
        student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    counted = int((batch["labels"][:, 1:] != -100).sum())
    for _ in range(2):
        with _HostReads() as reads:
            losses.append(trainer.compute_loss(student, dict(batch), num_items_in_batch=counted))
        # the loss's token count, whether any logit is -inf (once for the batch, not per block of rows) and the
        # guard's check: the three terms' values are not read here
        assert reads.count - 2 * forward_reads.count <= 3, (reads.count, forward_reads.count)  # student + teacher
    logs = {"loss": 1.0}
    trainer.log(logs)
    for name in ("forward_kl", "reverse_kl", "cross_entropy"):
        assert logs[f"weight/{name}"] > 0 and logs[f"loss/{name}"] > 0
    total = sum(logs[f"weight/{t.name}"] * logs[f"loss/{t.name}"] for t in terms)
    assert abs(total - float(losses[0])) < 1e-4 * float(losses[0])
