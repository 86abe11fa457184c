"""A DistillationTrainer over seq2seq batches, shared by this folder's tests (not a test module)."""

from transformers import TrainingArguments

from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.trainer import DistillationTrainer

PAD = 0


def seq2seq_trainer(student, teacher, tmp_path, terms=None, temperature: float = 1.0, **kw) -> DistillationTrainer:
    """terms: the logit losses (forward KL alone when None); kw: DistillationTrainer's own arguments (aux, fused)."""
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                             remove_unused_columns=False, save_strategy="no")
    objective = DistillObjective(terms or [LossTerm("forward_kl", 1.0)], temperature=temperature)
    return DistillationTrainer(model=student, args=args, objective=objective, teacher=teacher, task_type="seq2seq",
                               data_collator=DistillCollator(PAD, task_type="seq2seq"), **kw)
