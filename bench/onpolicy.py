"""On-policy (GKD) benchmark: student sampling tokens/s and full on-policy step time, ours vs TRL's GKDTrainer.

    /tmp/trlvenv/bin/python bench/onpolicy.py [--steps 12] [--batch 8] [--max-new-tokens 64] [--threads 1]

TRL is a peer for this comparison only (not a dependency): run the script from a venv that has both trl and
lmdistill (`python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install -c constraints.txt torch==2.13.0+cpu
trl==1.16.0 -e .`). Without trl it measures ours alone.

Same models, data and settings on both sides: a tokenizer trained here (ChatML template), a Llama teacher 4x128 and
student 2x64 built from configs, chat prompts answered by the student with lmbda = 1 (every batch on-policy),
sampling temperature 1, top_p 1, KV cache, reverse KL at T = 1 (TRL: beta = 1), AdamW, one thread.
  1. sampling: completion tokens per second of one batched student generate (ours: `sample_batch`; TRL:
     `GKDTrainer.generate_on_policy_outputs`), best of 3 rounds of `--steps` batches, same seeds;
  2. step: wall seconds per optimiser step of `trainer.train()` (sample + teacher + student forward/backward +
     optimiser), from the end of step 1 to the end of the last step.
Prints a markdown table with the ratio ours / TRL (>= 1.0x means ours is at least as fast).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments

from lmdistill.config import GenerationSettings, OnPolicySettings
from lmdistill.data.collate import DistillCollator
from lmdistill.data.tokenize import encode_rows
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.models.tiny import tiny_causal_lm, train_tokenizer
from lmdistill.train.onpolicy import OnPolicyTrainer, batch_prompts, sample_batch
from lmdistill.train.stage import ListDataset

WORDS = ("bank market fund company analyst trader reports expects buys sells explains measures predicts reviews higher "
         "yields quarterly results small loss strong growth new bonds interest rate cash flow annual report risk "
         "dividends today this year March after the meeting for investors again slowly with care").split()


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": "What does the " + " ".join(rng.choices(WORDS, k=8)) + "?",
             "response": " ".join(rng.choices(WORDS, k=12)) + ".", "row_id": i} for i in range(n)]


class StepClock(TrainerCallback):
    """When each optimiser step ends. Steps are timed end to end (previous end -> this end), so everything a step
    does counts, wherever it happens: ours samples in `get_batch_samples`, before Trainer's on_step_begin."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        """Mean over steps 2..n (the first step is warm-up)."""
        return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)


def _models(folder: Path):
    tok = train_tokenizer([r["prompt"] + " " + r["response"] for r in _rows(400)], vocab_size=512)
    tok.save_pretrained(folder / "tok")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tok")
    teacher = tiny_causal_lm(len(tokenizer), num_layers=4, hidden_size=128, seed=1).eval()
    teacher.requires_grad_(False)
    return tokenizer, teacher


def _student(tokenizer):
    return tiny_causal_lm(len(tokenizer), num_layers=2, hidden_size=64, seed=2)


def _args(folder: Path, a) -> dict:
    return dict(output_dir=str(folder), use_cpu=True, report_to=[], per_device_train_batch_size=a.batch,
                max_steps=a.steps, learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=a.steps,
                save_strategy="no", seed=0, disable_tqdm=True)


def best_sampling_rate(batches, sample_labels, repeats: int = 3) -> float:
    """Best of `repeats` passes: sampled (trained-on) tokens per second; `sample_labels(batch)` returns labels."""
    best = 0.0
    for _ in range(repeats):
        torch.manual_seed(0)
        tokens, start = 0, time.perf_counter()
        for batch in batches:
            tokens += int((sample_labels(batch) != -100).sum())
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def bench_ours(folder: Path, tokenizer, teacher, a) -> tuple[float, float]:
    examples = encode_rows(_rows(a.batch * a.steps), tokenizer, max_length=96).examples
    collator = DistillCollator(tokenizer.pad_token_id)
    settings = GenerationSettings(temperature=1.0, top_p=1.0, max_new_tokens=a.max_new_tokens)
    student = _student(tokenizer)
    batches = [collator(examples[i:i + a.batch]) for i in range(0, len(examples), a.batch)]
    best = best_sampling_rate(batches, lambda batch: sample_batch(
        student, batch_prompts(batch), collator, settings, tokenizer.eos_token_id)["labels"])
    clock = StepClock()
    trainer = OnPolicyTrainer(model=_student(tokenizer), args=TrainingArguments(**_args(folder / "ours", a)),
                              train_dataset=ListDataset(examples), data_collator=collator, processing_class=tokenizer,
                              objective=DistillObjective([LossTerm("reverse_kl")]), teacher=teacher,
                              onpolicy=OnPolicySettings(lmbda=1.0), generation=settings, seed=0, callbacks=[clock])
    trainer.train()
    return best, clock.seconds_per_step()


def bench_trl(folder: Path, tokenizer, teacher, a) -> tuple[float, float] | None:
    try:
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        return None
    rows = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
            for r in _rows(a.batch * a.steps)]
    # TRL's config turns gradient checkpointing on by default, and then samples without the KV cache; off here so
    # both sides sample with the cache, as the comparison is about the same settings.
    config = GKDConfig(**_args(folder / "trl", a), lmbda=1.0, beta=1.0, temperature=1.0,
                       max_new_tokens=a.max_new_tokens, max_length=96, gradient_checkpointing=a.trl_checkpointing)
    clock = StepClock()
    trainer = GKDTrainer(model=_student(tokenizer), teacher_model=teacher, args=config,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[clock])
    student = trainer.model
    collator = trainer.data_collator
    batches = [collator(rows[i:i + a.batch]) for i in range(0, len(rows), a.batch)]
    best = best_sampling_rate(batches, lambda batch: GKDTrainer.generate_on_policy_outputs(
        student, batch, trainer.generation_config)[2])
    trainer.train()
    return best, clock.seconds_per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trl-checkpointing", action="store_true",
                        help="TRL's default: gradient checkpointing on, sampling without the KV cache")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer, teacher = _models(folder)
        ours = bench_ours(folder, tokenizer, teacher, a)
        trl = bench_trl(folder, tokenizer, teacher, a)
    print(f"batch {a.batch}, max_new_tokens {a.max_new_tokens}, {a.steps} steps, {a.threads} thread(s); teacher 4x128, "
          f"student 2x64, lmbda 1, reverse KL; TRL gradient checkpointing {a.trl_checkpointing}\n")
    print("| measure | lmdistill | TRL GKDTrainer | ours / TRL |")
    print("|---|---|---|---|")
    names = ("student sampling, tokens/s", "on-policy step, s")
    for i, name in enumerate(names):
        theirs = f"{trl[i]:.3f}" if trl else "(trl not installed)"
        # Higher is better for tokens/s, lower for seconds: the ratio is 'how many times as fast'.
        ratio = (ours[i] / trl[i] if i == 0 else trl[i] / ours[i]) if trl else float("nan")
        print(f"| {name} | {ours[i]:.3f} | {theirs} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
