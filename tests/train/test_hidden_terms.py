"""Feature, attention and contrastive terms through the trainer count the response tokens only (the label mask, after
the causal shift), as the logit terms do, and are normalised alike over an accumulated batch: float64 references on
the fixture models."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.config import StageSettings
from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.stage import build_aux
from lmdistill.train.trainer import DistillationTrainer

TERMS = {"feature": {"name": "feature", "weight": 1.0},
         "attention": {"name": "attention", "weight": 1.0, "heads": "average"},
         "contrastive": {"name": "contrastive", "weight": 1.0, "temperature": 0.5}}


def _rows():
    g = torch.Generator().manual_seed(3)
    rows = []
    for prompt, answer in ((7, 3), (3, 8), (10, 2), (4, 4)):
        ids = torch.randint(5, 300, (prompt + answer,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "example_id": len(rows)})
    return rows


@pytest.fixture(scope="module")
def models(student_dir, teacher_dir):
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval().requires_grad_(False)
    return student, teacher


def _trainer(models, tmp_path, name):
    student, teacher = models
    zero_ce = {"name": "cross_entropy", "weight": 0.0}  # the logit objective needs a term; this one adds nothing
    aux = build_aux(StageSettings(name="s", losses=[zero_ce, TERMS[name]]), student, teacher)
    args = TrainingArguments(output_dir=str(tmp_path / name), report_to="none", use_cpu=True,
                             remove_unused_columns=False, save_strategy="no")
    return DistillationTrainer(model=student, args=args, data_collator=DistillCollator(0), teacher=teacher,
                               objective=DistillObjective([LossTerm("cross_entropy", 0.0)]), aux=aux)


def _reference(name, trainer, batch) -> torch.Tensor:
    """The term as a mean over response positions (position t counts when label t + 1 does), in float64."""
    s64, t64 = copy.deepcopy(trainer.model).double(), copy.deepcopy(trainer.teacher).double()
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
              output_attentions=name == "attention")
    with torch.no_grad():
        s, t = s64(**kw), t64(**kw)
    counted = torch.nn.functional.pad(batch["labels"][:, 1:] != -100, (0, 1))  # [B, T]
    module = copy.deepcopy(getattr(trainer.aux, name)).double()
    if name == "feature":
        per_token = torch.stack([(proj(s.hidden_states[i + 1]) - t.hidden_states[j + 1]).pow(2).mean(-1)
                                 for (i, j), proj in zip(module.layer_map, module.projections)]).mean(0)
    elif name == "attention":
        def row_kl(student_map, teacher_map):
            q, p = student_map.mean(1), teacher_map.mean(1)  # heads averaged: [B, T, T]
            return (torch.special.xlogy(p, p) - p * q.clamp_min(torch.finfo(torch.float32).tiny).log()).sum(-1)
        per_token = torch.stack([row_kl(s.attentions[i], t.attentions[j]) for i, j in module.layer_map]).mean(0)
    else:
        w = counted.sum(1).double()
        m = counted.double()[..., None]

        def embed(states, proj):
            z = proj((states * m).sum(1) / m.sum(1))
            return z / z.norm(dim=-1, keepdim=True)

        logits = embed(s.hidden_states[-1], module.student_proj) @ embed(t.hidden_states[-1], module.teacher_proj).T
        logits = logits / module.temperature
        per_row = 0.5 * (logits.logsumexp(1) + logits.logsumexp(0)) - logits.diag()
        return (per_row * w).sum() / w.sum()
    return per_token[counted].sum() / counted.sum()


@pytest.mark.parametrize("name", TERMS)
def test_terms_count_response_tokens_only(name, models, tmp_path):
    trainer = _trainer(models, tmp_path, name)
    batch = DistillCollator(0)(_rows())
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(got.double(), _reference(name, trainer, batch), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["feature", "attention"])
def test_micro_batches_add_up_to_the_whole_batch(name, models, tmp_path):
    """Two micro-batches, each divided by the tokens counted in both (num_items), sum to the whole batch's loss."""
    trainer = _trainer(models, tmp_path, name)
    rows = _rows()
    whole = DistillCollator(0)(rows)
    num_items = (whole["labels"][:, 1:] != -100).sum()
    with torch.no_grad():
        parts = [trainer.compute_loss(trainer.model, dict(DistillCollator(0)(half)), num_items_in_batch=num_items)
                 for half in (rows[:1], rows[1:])]
        together = trainer.compute_loss(trainer.model, dict(whole), num_items_in_batch=num_items)
    torch.testing.assert_close(sum(parts), together, rtol=1e-5, atol=1e-6)
