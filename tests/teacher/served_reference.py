"""What the served-teacher tests (fake server and real vLLM) share: an on-policy trainer over a given teacher source,
and the plain top-k KL they compare its loss with."""

import torch
from transformers import TrainingArguments

from lmdistill.config import GenerationSettings, OnPolicySettings
from lmdistill.data.collate import DistillCollator
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.train.onpolicy import OnPolicyTrainer
from lmdistill.train.stage import ListDataset

SAMPLING = GenerationSettings(temperature=1.0, top_p=0.95, max_new_tokens=6)


def policy_trainer(tmp_path, student, tokenizer, generation=SAMPLING, onpolicy=None, **teacher) -> OnPolicyTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                             max_steps=1, save_strategy="no", seed=0)
    return OnPolicyTrainer(model=student, args=args, train_dataset=ListDataset([]), processing_class=tokenizer,
                           data_collator=DistillCollator(tokenizer.pad_token_id),
                           objective=DistillObjective([LossTerm("forward_kl")]), generation=generation, seed=0,
                           onpolicy=onpolicy or OnPolicySettings(lmbda=1.0), **teacher)


def top_k_forward_kl(student_logits, teacher_logits, labels, k: int) -> float:
    """Plain reference: KL(p || q) over the teacher's k most likely ids plus one bucket for all other ids, summed
    over the counted tokens."""
    counted = labels != -100
    log_p, log_q = (x[counted].double().log_softmax(-1) for x in (teacher_logits, student_logits))
    top = log_p.topk(k, dim=-1)
    p_kept, q_kept = top.values.exp(), log_q.gather(-1, top.indices).exp()
    p, q = p_kept, q_kept
    if k < log_p.shape[-1]:  # with k = V there is no rest (1 - sum would be rounding noise)
        p, q = (torch.cat([kept, 1 - kept.sum(-1, keepdim=True)], -1) for kept in (p_kept, q_kept))
    return float((torch.xlogy(p, p) - torch.xlogy(p, q)).sum())


def chat_batch(tokenizer, questions: list[str]) -> dict[str, torch.Tensor]:
    """Chat prompts (masked) with a short response each, collated."""
    examples = []
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(" It reports risk.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append({"input_ids": p_ids + r_ids, "labels": [-100] * len(p_ids) + r_ids})
    return DistillCollator(tokenizer.pad_token_id)(examples)
