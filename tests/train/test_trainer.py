"""DistillationTrainer: accumulation equals a big batch, teacher stays frozen, non-finite steps are skipped."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

from lmdistill.data.collate import DistillCollator
from lmdistill.errors import TrainingError
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.trainer import DistillationTrainer


def _examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 20, (1,), generator=g))
        ids = torch.randint(5, 300, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "example_id": i})
    return out


def _train_once(student_dir, teacher, batch, accum, tmp_path, objective=None, steps=1, clip=0.0, fused=False):
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    args = TrainingArguments(output_dir=str(tmp_path / f"o{batch}x{accum}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, max_steps=steps, learning_rate=0.1, optim="sgd",
                             lr_scheduler_type="constant", max_grad_norm=clip, report_to="none", use_cpu=True,
                             train_sampling_strategy="sequential", remove_unused_columns=False, save_strategy="no",
                             logging_steps=1)
    objective = objective or DistillObjective(terms=[LossTerm("forward_kl", 0.7, {}), LossTerm("cross_entropy", 0.3, {})],
                                              temperature=2.0)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=_examples(),
                                  data_collator=DistillCollator(0), objective=objective, teacher=teacher, fused=fused)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    return before, student, trainer


def _loss_trainer(student, teacher, tmp_path, objective, stage_losses=None, **kw) -> DistillationTrainer:
    """A trainer to call compute_loss on (no training): `objective`, plus the hidden-state terms of `stage_losses`."""
    from lmdistill.config import StageSettings
    from lmdistill.train.stage import build_aux

    aux = build_aux(StageSettings(name="s", losses=stage_losses), student, teacher) if stage_losses else None
    args = TrainingArguments(output_dir=str(tmp_path / "loss"), report_to="none", use_cpu=True,
                             remove_unused_columns=False, save_strategy="no")
    return DistillationTrainer(model=student, args=args, data_collator=DistillCollator(0), teacher=teacher,
                               objective=objective, aux=aux, **kw)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    return model.eval().requires_grad_(False)


def test_accumulation_matches_one_big_batch(student_dir, teacher, tmp_path):
    before, small, _ = _train_once(student_dir, teacher, batch=2, accum=4, tmp_path=tmp_path)
    _, big, _ = _train_once(student_dir, teacher, batch=8, accum=1, tmp_path=tmp_path)
    moved = 0
    for (name, p_small), p_big in zip(small.state_dict().items(), big.state_dict().values()):
        delta_small, delta_big = p_small - before[name], p_big - before[name]
        torch.testing.assert_close(delta_small, delta_big, atol=1e-5, rtol=1e-4, msg=name)
        moved += int(delta_big.abs().max() > 0)
    assert moved > 0


def test_teacher_is_untouched(student_dir, teacher, tmp_path):
    snapshot = copy.deepcopy(teacher.state_dict())
    _train_once(student_dir, teacher, batch=4, accum=1, tmp_path=tmp_path, steps=2)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, snapshot[k])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


class _NaNOnce(DistillObjective):
    """An objective whose first call is NaN; the rest are the real objective."""

    calls = 0

    def __call__(self, *a, **kw):
        out = super().__call__(*a, **kw)
        type(self).calls += 1
        if type(self).calls == 1:
            out.terms["forward_kl"] = out.terms["forward_kl"] * float("nan")
            out.total = out.total * float("nan")
        return out


def test_nonfinite_step_is_skipped_then_training_continues(student_dir, teacher, tmp_path, caplog):
    objective = _NaNOnce(terms=[LossTerm("forward_kl", 1.0, {})], temperature=1.0)
    before, student, trainer = _train_once(student_dir, teacher, batch=8, accum=1, tmp_path=tmp_path,
                                           objective=objective, steps=1)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k  # the NaN step changed nothing
    assert "non-finite loss term(s) forward_kl" in caplog.text


@pytest.mark.parametrize("fused", [False, True])
def test_a_token_the_teacher_gives_no_mass_makes_reverse_kl_infinite_and_skips_the_step(student_dir, teacher_dir,
                                                                                        tmp_path, caplog, fused):
    """A teacher whose lm_head bias is -inf on a token the student gives mass: reverse KL is +inf, on the written-out
    gradient's paths (logits and fused) as through autograd, so the guard skips the step rather than apply the
    huge gradient that flooring the teacher's log-probs would give."""
    bad_teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    head = bad_teacher.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()[7] = float("-inf")
    bad_teacher.lm_head = biased
    bad_teacher.eval().requires_grad_(False)
    objective = DistillObjective(terms=[LossTerm("reverse_kl", 1.0, {})], temperature=1.0)
    before, student, _ = _train_once(student_dir, bad_teacher, batch=8, accum=1, tmp_path=tmp_path,
                                     objective=objective, fused=fused)
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "non-finite loss term(s) reverse_kl; skipping this step" in caplog.text


@pytest.mark.parametrize("fused", [False, True])
def test_a_micro_batch_with_no_counted_label_adds_nothing(student_dir, teacher, tmp_path, fused):
    """A micro-batch whose labels are all -100 (under several processes, a round of filler rows, data/rounds.py):
    the logits are formed at no position, and the loss is 0 with no gradient, not an error."""
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    objective = DistillObjective([LossTerm("forward_kl", 0.7, {}), LossTerm("cross_entropy", 0.3, {})])
    trainer = _loss_trainer(student, teacher, tmp_path, objective, fused=fused)
    batch = DistillCollator(0)(_examples(2))
    batch["labels"][:] = -100
    loss = trainer.compute_loss(student, dict(batch), num_items_in_batch=torch.tensor(7))
    loss.backward()
    assert loss.item() == 0 and all(p.grad is None or not p.grad.any() for p in student.parameters())


def test_eval_loss_is_the_mean_over_every_eval_token(student_dir, teacher, tmp_path):
    """eval_loss is the objective over all the eval set's counted tokens, however its rows fall into batches (so
    also under several processes, test_ddp_rounds.py). Trainer's own, a mean of the batches' losses weighted by
    their rows, gives a short last batch's tokens more weight."""
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    trainer = _loss_trainer(student, teacher, tmp_path, DistillObjective([LossTerm("cross_entropy", 1.0, {})]))
    trainer.args.per_device_eval_batch_size = 2
    rows = _examples(5)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in rows:
            labels = torch.tensor(ex["labels"][1:])
            logits = student(torch.tensor([ex["input_ids"]])).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += int((labels != -100).sum())
    assert trainer.evaluate(rows)["eval_loss"] == pytest.approx(total / count, rel=1e-5)


def test_three_nonfinite_in_a_row_stop_the_run_naming_the_term(student_dir, tmp_path):
    bad_teacher = AutoModelForCausalLM.from_pretrained(student_dir).eval().requires_grad_(False)
    with torch.no_grad():
        bad_teacher.lm_head.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss term\(s\) forward_kl were NaN/inf 3 steps in a row"):
        _train_once(student_dir, bad_teacher, batch=8, accum=1, tmp_path=tmp_path, steps=5)


def test_feature_projections_train_and_are_saved_with_checkpoints(student_dir, teacher, tmp_path):
    from lmdistill.config import StageSettings
    from lmdistill.train.stage import build_aux
    from lmdistill.train.trainer import AUX_FILE

    stage = StageSettings(name="f", losses=[{"name": "forward_kl"}, {"name": "feature", "weight": 1.0}])

    def trainer_for(run):
        torch.manual_seed(run)
        student = AutoModelForCausalLM.from_pretrained(student_dir)
        aux = build_aux(stage, student, teacher)
        args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=4, max_steps=2,
                                 learning_rate=0.05, optim="sgd", report_to="none", use_cpu=True, save_strategy="steps",
                                 save_steps=2, train_sampling_strategy="sequential", remove_unused_columns=False)
        return DistillationTrainer(model=student, args=args, train_dataset=_examples(), data_collator=DistillCollator(0),
                                   objective=DistillObjective([LossTerm("forward_kl", 1.0, {})]), teacher=teacher,
                                   aux=aux)

    trainer = trainer_for(0)
    before = {k: v.clone() for k, v in trainer.aux.feature.state_dict().items()}
    trainer.train()
    trained = trainer.aux.feature.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)  # projections are in the optimiser
    checkpoint = tmp_path / "ckpt" / "checkpoint-2"
    assert (checkpoint / AUX_FILE).exists()
    fresh = trainer_for(1)
    fresh._load_from_checkpoint(str(checkpoint))
    for k, v in fresh.aux.feature.state_dict().items():
        torch.testing.assert_close(v, trained[k])


def test_causal_shift_and_masks_match_a_plain_reference(student_dir, teacher, tmp_path):
    """Logits at t score token t+1; prompt and padding count nowhere; mean over counted tokens of the batch."""
    import torch.nn.functional as F

    _, student, trainer = _train_once(student_dir, teacher, batch=8, accum=1, tmp_path=tmp_path, steps=1,
                                      objective=DistillObjective([LossTerm("cross_entropy", 1.0, {})]))
    student.eval()
    rows = _examples()
    batch = DistillCollator(0)(rows)
    with torch.no_grad():
        got = trainer.compute_loss(student, dict(batch))
        total, count = 0.0, 0
        for row in rows:  # one unpadded example at a time, float64
            logits = student(torch.tensor([row["input_ids"]])).logits[0].double()
            labels = torch.tensor(row["labels"])
            for t in range(len(labels) - 1):
                if labels[t + 1] != -100:
                    total += -F.log_softmax(logits[t], -1)[labels[t + 1]].item()
                    count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)


def test_fused_trainer_path_equals_the_logits_path(student_dir, teacher, tmp_path):
    objective = DistillObjective([LossTerm("forward_kl", 0.7, {}), LossTerm("cross_entropy", 0.3, {})], temperature=2.0)
    _, student, plain = _train_once(student_dir, teacher, batch=8, accum=1, tmp_path=tmp_path, steps=1,
                                    objective=objective)
    fused = DistillationTrainer(model=student, args=plain.args, train_dataset=_examples(),
                                data_collator=DistillCollator(0), objective=objective, teacher=teacher, fused=True)
    batch = DistillCollator(0)(_examples())
    student.eval()
    losses = []
    for trainer in (plain, fused):
        student.zero_grad()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        losses.append((loss.detach(), student.lm_head.weight.grad.clone(), student.model.layers[0].mlp.up_proj.weight.grad.clone()))
    for a, b in zip(*losses):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_projection_gradients_are_clipped_and_cleared_each_step(student_dir, teacher, tmp_path):
    from lmdistill.config import StageSettings
    from lmdistill.train.stage import build_aux

    limit, lr = 1e-3, 1.0
    stage = StageSettings(name="f", losses=[{"name": "forward_kl"}, {"name": "feature", "weight": 1.0}])
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    aux = build_aux(stage, student, teacher)
    args = TrainingArguments(output_dir=str(tmp_path / "clip"), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=lr, optim="sgd", lr_scheduler_type="constant", max_grad_norm=limit,
                             report_to="none", use_cpu=True, save_strategy="no", train_sampling_strategy="sequential",
                             remove_unused_columns=False)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=_examples(), data_collator=DistillCollator(0),
                                  objective=DistillObjective([LossTerm("forward_kl", 1.0, {})]), teacher=teacher,
                                  aux=aux)
    steps = []
    trainer.add_callback(type("Watch", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: steps.append(
        {n: p.detach().clone() for n, p in aux.feature.named_parameters()})})())
    before = {n: p.detach().clone() for n, p in aux.feature.named_parameters()}
    trainer.train()
    for start, end in zip([before, *steps], steps):
        # SGD: the step is lr x the clipped gradient, whose norm over all projections is at most the limit.
        moved = torch.sqrt(sum(((end[n] - start[n]) ** 2).sum() for n in start))
        assert 0 < moved <= lr * limit * (1 + 1e-4)
    assert all(p.grad is None for p in aux.feature.parameters())  # cleared after the step, as the model's are



def test_fused_path_cuts_padded_head_rows_like_the_logits_path(student_dir, teacher, tmp_path):
    """A student head padded past the shared vocabulary: both paths score the shared rows only."""
    objective = DistillObjective([LossTerm("forward_kl", 0.7, {}), LossTerm("cross_entropy", 0.3, {})], temperature=2.0)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    shared = student.get_output_embeddings().weight.shape[0]
    student.resize_token_embeddings(shared + 8)
    with torch.no_grad():
        student.get_output_embeddings().weight[shared:] = 5.0  # padding rows that would dominate a softmax
    batch = DistillCollator(0)(_examples())
    student.eval()
    losses = []
    for fused in (False, True):
        trainer = _loss_trainer(student, teacher, tmp_path, objective, shared_vocab=shared, fused=fused)
        student.zero_grad()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        losses.append((loss.detach(), student.model.layers[0].mlp.up_proj.weight.grad.clone()))
    for plain, fused in zip(*losses):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-6)


def test_hidden_state_terms_are_not_multiplied_by_the_process_count(student_dir, teacher, tmp_path, monkeypatch):
    """Under N processes a logit term is this process's share of a global mean (num_items counts every process's
    tokens) and the loss is multiplied by N against DDP's gradient average. The feature term, a per-process mean,
    must come out of that as itself: two simulated processes holding equal batches give the one-process loss."""
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    trainer = _loss_trainer(student, teacher, tmp_path, DistillObjective([LossTerm("forward_kl", 1.0, {})]),
                            [{"name": "forward_kl"}, {"name": "feature", "weight": 1.0}])
    batch = DistillCollator(0)(_examples())
    counted = (batch["labels"][:, 1:] != -100).sum()
    student.eval()
    one = trainer.compute_loss(student, dict(batch), num_items_in_batch=counted)
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    two = trainer.compute_loss(student, dict(batch), num_items_in_batch=2 * counted)
    torch.testing.assert_close(two, one)


def test_fused_refuses_a_lora_adapter_on_the_lm_head(student_dir, teacher, tmp_path):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(AutoModelForCausalLM.from_pretrained(student_dir),
                             LoraConfig(r=2, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    with pytest.raises(TrainingError, match="LoRA adapter on lm_head would be left out.*target_modules"):
        _loss_trainer(student, teacher, tmp_path, DistillObjective([LossTerm("forward_kl", 1.0, {})]), fused=True)


def test_teacher_logits_are_not_computed_for_hidden_state_terms_alone(student_dir, teacher, tmp_path):
    """CE on labels plus a feature term: the teacher runs for its hidden states, and its [B, T, V] logits, which no
    term reads, are never formed."""
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    trainer = _loss_trainer(student, teacher, tmp_path, DistillObjective([LossTerm("cross_entropy", 1.0, {})]),
                            [{"name": "cross_entropy"}, {"name": "feature", "weight": 1.0}])
    widths = []
    hook = teacher.lm_head.register_forward_hook(lambda module, args, out: widths.append(out.shape[-1]))
    try:
        loss = trainer.compute_loss(student, DistillCollator(0)(_examples()))
    finally:
        hook.remove()
    assert torch.isfinite(loss) and widths == [0]
