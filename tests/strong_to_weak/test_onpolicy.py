"""On-policy batches: built from the student's own samples, masked right, counted right; loss falls; replay."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.config import GenerationSettings, OnPolicySettings
from lmdistill.data.collate import DistillCollator
from lmdistill.data.rounds import FILLER
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.onpolicy import OnPolicyTrainer, ReplayBuffer, batch_prompts, sample_batch
from lmdistill.train.stage import ListDataset

SAMPLING = GenerationSettings(temperature=1.0, top_p=0.95, max_new_tokens=7)
PROMPTS = ["What does the bank report?", "What does a trader report?", "What does our fund report?",
           "What does the market report?"]


@pytest.fixture(scope="module")
def models(teacher_dir, student_dir):
    return (AutoModelForCausalLM.from_pretrained(teacher_dir).eval(),
            AutoModelForCausalLM.from_pretrained(student_dir))


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Chat examples: templated prompt (masked) + a short response."""
    out = []
    for i, question in enumerate(PROMPTS):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(" It reports risk.", add_special_tokens=False)["input_ids"][: 2 + i] + [tokenizer.eos_token_id]
        out.append({"input_ids": p_ids + r_ids, "labels": [-100] * len(p_ids) + r_ids, "prompt_length": len(p_ids),
                    "example_id": i})
    return out


def _reference_generate(model, prompts, tokenizer, eos, seed):
    """Plain per-row reference: left-pad by hand, sample with the same seed, cut each row after its first eos."""
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=SAMPLING.temperature,
                         top_p=SAMPLING.top_p, top_k=0, max_new_tokens=SAMPLING.max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_batch_is_the_students_samples_with_exact_masks(models, examples, tokenizer):
    _, student = models
    collator = DistillCollator(tokenizer.pad_token_id)
    batch = collator(examples)
    prompts = batch_prompts(batch)
    assert prompts == [ex["input_ids"][: ex["prompt_length"]] for ex in examples]
    # An eos the student really samples early in row 0, so rows end at different places.
    eos = _reference_generate(student, prompts, tokenizer, tokenizer.eos_token_id, seed=3)[0][2]
    reference = _reference_generate(student, prompts, tokenizer, eos, seed=3)
    student.train()
    torch.manual_seed(3)
    sampled = sample_batch(student, prompts, collator, SAMPLING, eos)
    assert student.training  # sampled in eval mode, train mode given back
    assert len(reference[0]) <= 3 and reference[0][-1] == eos
    width = max(len(p) + len(c) for p, c in zip(prompts, reference))
    assert sampled["input_ids"].shape == (len(prompts), width)
    for i, (prompt, completion) in enumerate(zip(prompts, reference)):
        n, m = len(prompt), len(completion)
        pad = width - n - m
        assert sampled["input_ids"][i].tolist() == prompt + completion + [tokenizer.pad_token_id] * pad
        assert sampled["attention_mask"][i].tolist() == [1] * (n + m) + [0] * pad
        assert sampled["labels"][i].tolist() == [-100] * n + completion + [-100] * pad


def _trainer(tmp_path, models, examples, tokenizer, **onpolicy):
    teacher, student = models
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             learning_rate=3e-3, lr_scheduler_type="constant", max_steps=1, logging_steps=1,
                             save_strategy="no", seed=0)
    return OnPolicyTrainer(model=student, args=args, train_dataset=ListDataset(examples),
                           data_collator=DistillCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                           objective=DistillObjective([LossTerm("reverse_kl")]), teacher=teacher,
                           onpolicy=OnPolicySettings(**onpolicy), generation=SAMPLING, seed=0)


def test_lmbda_picks_student_teacher_or_dataset_and_counts_tokens(tmp_path, models, examples, tokenizer):
    teacher, student = models
    batch = DistillCollator(tokenizer.pad_token_id)(examples)
    prompts = batch_prompts(batch)
    eos = tokenizer.eos_token_id

    trainer = _trainer(tmp_path, models, examples, tokenizer, lmbda=1.0)
    torch.manual_seed(5)
    got = trainer.policy_batch(batch, 0)
    torch.manual_seed(5)
    want = sample_batch(student, prompts, trainer._collator, SAMPLING, eos)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # Trainer's per-step gathering: swapped micro-batches, and the token count is theirs, after the causal shift.
    batches, count = trainer.get_batch_samples(iter([batch, batch]), 2, torch.device("cpu"))
    assert all(not torch.equal(b["input_ids"], batch["input_ids"]) for b in batches)
    assert int(count) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

    assert _trainer(tmp_path, models, examples, tokenizer, lmbda=0.0).policy_batch(batch, 0) is batch
    seq_kd = _trainer(tmp_path, models, examples, tokenizer, lmbda=0.0, seq_kd=True)
    torch.manual_seed(6)
    got = seq_kd.policy_batch(batch, 0)
    torch.manual_seed(6)
    want = sample_batch(teacher, prompts, seq_kd._collator, SAMPLING, eos)
    assert torch.equal(got["input_ids"], want["input_ids"])

    # lmbda 0.5: about half the micro-batches go on-policy (the draws are fixed by seed, step and position)
    half = _trainer(tmp_path, models, examples, tokenizer, lmbda=0.5)
    for step in range(16):
        half.state.global_step = step
        half.policy_batch(batch, 0)
    assert 4 <= half._counts["student"] <= 12 and half._counts["student"] + half._counts["dataset"] == 16


def test_the_completion_of_a_filler_row_counts_nothing(tmp_path, models, examples, tokenizer):
    """Under several processes the last round may hold filler rows (data/rounds.py): the completion sampled for a
    filler's prompt trains no label, and the step's token count leaves it out."""
    trainer = _trainer(tmp_path, models, examples, tokenizer, lmbda=1.0)
    batch = DistillCollator(tokenizer.pad_token_id)([*examples[:-1], {**examples[-1], FILLER: True}])
    (sampled,), count = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    assert FILLER not in sampled and FILLER not in batch
    assert (sampled["labels"][-1] == -100).all() and (sampled["labels"][:-1] != -100).any(-1).all()
    assert int(count) == int((sampled["labels"][:, 1:] != -100).sum())


def test_a_fillers_completion_stays_out_of_the_replay_buffer(tmp_path, models, examples, tokenizer):
    """Replayed at a later step, a completion sampled for a filler's prompt would no longer be marked, and would
    train: only the read rows' completions enter the buffer. A micro-batch of fillers only (one process's share of the
    last round) still adds one, with every label masked: each process's buffer grows at the same steps, so a process
    does not sample anew (a collective generate for a sharded student) while the others replay."""
    collate = DistillCollator(tokenizer.pad_token_id)
    fillers = [{**ex, FILLER: True} for ex in examples]

    def step(trainer, rows):
        (trained,), count = trainer.get_batch_samples(iter([collate(rows)]), 1, torch.device("cpu"))
        assert int(count) == int((trained["labels"][:, 1:] != -100).sum())
        return trained

    trainer = _trainer(tmp_path, models, examples, tokenizer, lmbda=1.0, replay_size=4, replay_ratio=0.9)
    sampled = step(trainer, [*examples[:2], *fillers[2:]])  # buffer empty: sampled anew
    assert (sampled["labels"][:2] != -100).any(-1).all() and (sampled["labels"][2:] == -100).all()
    assert trainer._counts["replayed"] == 0 and len(trainer.replay) == 1
    replayed = step(trainer, examples)  # drawn from the buffer (at step 0, a draw below replay_ratio)
    assert trainer._counts["replayed"] == 1
    assert torch.equal(replayed["input_ids"], sampled["input_ids"][:2])
    assert torch.equal(replayed["labels"], sampled["labels"][:2])

    only_fillers = _trainer(tmp_path, models, examples, tokenizer, lmbda=1.0, replay_size=4, replay_ratio=0.9)
    assert (step(only_fillers, fillers)["labels"] == -100).all()
    assert len(only_fillers.replay) == 1  # as the process that read real rows at this step
    replayed = step(only_fillers, examples)  # replayed, as that process does: the masked batch trains nothing
    assert only_fillers._counts == {"student": 1, "replayed": 1, "teacher": 0, "dataset": 0}
    assert (replayed["labels"] == -100).all()


def test_replay_buffer_is_bounded_and_reused(tmp_path, models, examples, tokenizer):
    buffer = ReplayBuffer(2)
    for i in range(3):
        buffer.add({"input_ids": torch.full((1, 2), i)})
    assert len(buffer) == 2 and [int(b["input_ids"][0, 0]) for b in buffer.batches] == [1, 2]
    assert int(buffer.draw(0.99, torch.device("cpu"))["input_ids"][0, 0]) == 2

    trainer = _trainer(tmp_path, models, examples, tokenizer, lmbda=1.0, replay_size=3, replay_ratio=0.5)
    batch = DistillCollator(tokenizer.pad_token_id)(examples)
    seen = []
    for step in range(12):
        trainer.state.global_step = step
        seen.append(trainer.policy_batch(batch, 0))
    assert trainer._counts["replayed"] > 0 and trainer._counts["student"] > 0 and len(trainer.replay) == 3
    fresh = [b["input_ids"] for b in seen]
    replayed = [i for i, b in enumerate(fresh) if any(j < i and torch.equal(b, fresh[j]) for j in range(i))]
    assert len(replayed) == trainer._counts["replayed"]


def test_on_policy_training_lowers_reverse_kl(tmp_path, models, examples, tokenizer):
    teacher, _ = models
    trainer = _trainer(tmp_path, models, examples * 4, tokenizer, lmbda=1.0)
    trainer.args.max_steps = 8
    student = trainer.model
    torch.manual_seed(11)
    held = sample_batch(student, batch_prompts(DistillCollator(0)(examples)), trainer._collator, SAMPLING,
                        tokenizer.eos_token_id)

    def reverse_kl() -> float:
        with torch.no_grad():
            s = student(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits[:, :-1]
            t = teacher(input_ids=held["input_ids"], attention_mask=held["attention_mask"]).logits[:, :-1]
        counted = held["labels"][:, 1:] != -100
        log_q, log_p = s.log_softmax(-1).double(), t.log_softmax(-1).double()
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)  # reverse KL, T = 1
        return float(per_token[counted].mean())

    before = reverse_kl()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    after = reverse_kl()
    assert len(losses) == 8 and all(e.get("onpolicy/student_share") == 1.0 for e in trainer.state.log_history
                                     if "loss" in e)
    assert after < 0.8 * before, (before, after, losses)
    assert sum(losses[-3:]) < sum(losses[:3])
