"""Calibrate the embedded demo: does a distilled student beat a same-size CE-only baseline, within budget?

Plain PyTorch loops over the demo data (lmdistill.demo.corpus), with tiny Llama models from
lmdistill.models.tiny. It trains a teacher on everything (general text, company profiles, labelled QA for
every company), then two students through the same 3 stages and steps:
  baseline   CE on general text and on the labelled QA subset only;
  distilled  alpha*CE + (1-alpha)*T^2*forward-KL on the same data, plus the unlabelled prompts answered by the
             teacher (greedy), so it also learns from the teacher about the companies nobody labelled.
Stage 1 is general text only, stage 2 moves the domain share from 0.3 to 0.7, stage 3 is domain only.
Prints one row per model: domain exact match on held-out phrasings (all / labelled / unlabelled companies),
domain perplexity (answer tokens), general perplexity, parameters and wall time.

    .venv/bin/python bench/demo_calibration.py [--quick] [--teacher 4x256] [--student 2x128] ...
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lmdistill.demo.corpus import build_demo_rows
from lmdistill.demo.recipe import ModelSize, StageRecipe, demo_recipe
from lmdistill.models.tiny import train_tokenizer, tiny_causal_lm

Row = tuple[list[int], list[int]]  # (input_ids, labels with -100 where no loss is taken)


def encode_text(tok, text: str) -> Row:
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    return ids, list(ids)


def prompt_ids(tok, prompt: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False)


def encode_qa(tok, prompt: str, completion: str) -> Row:
    p = prompt_ids(tok, prompt)
    c = tok(completion + "<|im_end|>")["input_ids"]
    return p + c, [-100] * len(p) + c


def collate(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] input_ids, attention_mask and labels."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at t score token t+1: returns [N, V] logits and [N] targets for the counted positions."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return logits[keep].float(), labels[keep]


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher/T) || softmax(student/T)); inputs [N, V]."""
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def train(model, sources: dict[str, list[Row]], stages: tuple[StageRecipe, ...], *, lr: float, batch: int,
          warmup_ratio: float, pad_id: int, seed: int, teacher=None) -> float:
    """Train through `stages` (fresh AdamW + warmup/cosine per stage, as separate pipeline stages do).

    `sources` has "general" and "domain". With a teacher the loss is the stage's alpha*CE + (1-alpha)*KD,
    without one it is CE. Returns wall seconds.
    """
    rng = random.Random(seed)
    start = time.perf_counter()
    model.train()
    for stage in stages:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        warmup = max(1, round(stage.steps * warmup_ratio))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * max(0, s - warmup) / max(1, stage.steps - warmup)))))
        for step in range(stage.steps):
            share = stage.domain_share[0] + (stage.domain_share[1] - stage.domain_share[0]) * step / max(1, stage.steps - 1)
            rows = [rng.choice(sources["domain"] if rng.random() < share else sources["general"]) for _ in range(batch)]
            ids, mask, labels = collate(rows, pad_id)
            logits, targets = shifted(model(input_ids=ids, attention_mask=mask).logits, labels)
            loss = F.cross_entropy(logits, targets)
            if teacher is not None:
                with torch.no_grad():
                    t_logits, _ = shifted(teacher(input_ids=ids, attention_mask=mask).logits, labels)
                loss = stage.alpha * loss + (1 - stage.alpha) * forward_kl(logits, t_logits, stage.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if (step + 1) % 100 == 0:
                print(f"  step {step + 1}/{stage.steps} loss {loss.item():.3f} {time.perf_counter() - start:.0f}s "
                      f"(CPU {time.process_time():.0f}s)",
                      flush=True)
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int, batch: int = 250) -> list[str]:
    """Greedy completions of chat-formatted `prompts`, cut at <|im_end|>."""
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i in range(0, len(prompts), batch):
        encoded = [prompt_ids(tok, p) for p in prompts[i:i + batch]]
        width = max(map(len, encoded))
        # Left padding so that every row's next token comes right after its own prompt.
        ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(e) for e in encoded])[:, None]).long()
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=end_id, pad_token_id=tok.pad_token_id)
        out += [tok.decode(g[width:], skip_special_tokens=False).split("<|im_end|>")[0].strip() for g in gen]
    return out


@torch.no_grad()
def perplexity(model, rows: list[Row], pad_id: int, batch: int = 64) -> float:
    """exp of the mean NLL over all counted tokens of `rows`."""
    nll, count = 0.0, 0
    for i in range(0, len(rows), batch):
        ids, mask, labels = collate(rows[i:i + batch], pad_id)
        logits, targets = shifted(model(input_ids=ids, attention_mask=mask).logits, labels)
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        count += targets.numel()
    return math.exp(nll / count)


def evaluate(name: str, model, tok, data: dict, enc: dict, seconds: float, steps: str, max_new_tokens: int) -> None:
    start = time.perf_counter()
    answers = greedy_answers(model, tok, [r["prompt"] for r in data["domain_eval"]], max_new_tokens)
    labelled = {f["name"] for f in data["domain_facts"] if f["labelled"]}
    hits = {"all": [], "lab": [], "unl": []}
    for row, answer in zip(data["domain_eval"], answers):
        ok = answer == row["completion"]
        hits["all"].append(ok)
        hits["lab" if any(n in row["prompt"] for n in labelled) else "unl"].append(ok)
    result = {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "steps": steps,
              "train_s": seconds, **{f"EM_{k}": sum(v) / max(1, len(v)) for k, v in hits.items()},
              "dom_ppl": perplexity(model, enc["domain_eval"], tok.pad_token_id),
              "gen_ppl": perplexity(model, enc["general_eval"], tok.pad_token_id),
              "eval_s": time.perf_counter() - start}
    print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in result.values()), flush=True)


def size(spec: str) -> ModelSize:
    layers, hidden = spec.split("x")
    return ModelSize(int(layers), int(hidden))


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CI variant: quick data and QUICK_RECIPE")
    ap.add_argument("--teacher", type=size, help="LxH, e.g. 4x192 (default: the recipe's)")
    ap.add_argument("--student", type=size, help="LxH, e.g. 2x96")
    ap.add_argument("--teacher-steps", type=int)
    ap.add_argument("--teacher-lr", type=float)
    ap.add_argument("--stages", help="steps of stage 1,2,3 for both students, e.g. 150,300,350")
    ap.add_argument("--lr", type=float, help="students' learning rate")
    ap.add_argument("--alpha", type=float, help="CE weight of the distilled student, every stage")
    ap.add_argument("--temperature", type=float, help="KD temperature, every stage")
    ap.add_argument("--cache", default="/tmp/demo_calibration", help="teachers are saved here and reused")
    ap.add_argument("--threads", type=int, default=2, help="torch threads; 1 is steadier on a loaded machine")
    return ap.parse_args()


def recipe_from(args: argparse.Namespace):
    """The demo recipe with the flags that were given applied on top."""
    recipe = demo_recipe(args.quick)
    stages = recipe.stages
    if args.stages:
        stages = tuple(replace(st, steps=int(n)) for st, n in zip(stages, args.stages.split(","), strict=True))
    if args.alpha is not None:
        stages = tuple(replace(st, alpha=args.alpha) for st in stages)
    if args.temperature is not None:
        stages = tuple(replace(st, temperature=args.temperature) for st in stages)
    overrides = {"teacher": args.teacher, "student": args.student, "teacher_steps": args.teacher_steps,
                 "teacher_lr": args.teacher_lr, "student_lr": args.lr}
    return replace(recipe, stages=stages, **{k: v for k, v in overrides.items() if v is not None})


def train_teacher(recipe, tok, data: dict, general: list[Row], cache: Path, quick: bool):
    """Train the teacher on its mixture, or load it from `cache` if this exact setting was trained before."""
    from transformers import AutoModelForCausalLM

    t = recipe.teacher
    key = (f"{'quick' if quick else 'full'}_v{recipe.vocab_size}_{t.layers}x{t.hidden}_{recipe.teacher_steps}_"
           f"{recipe.teacher_lr}_{recipe.batch_size}_{recipe.warmup_ratio}")
    path = cache / key
    if path.exists():
        return AutoModelForCausalLM.from_pretrained(path).eval(), float((path / "train_s").read_text()), "cached"
    mix = recipe.teacher_mix
    docs = [encode_text(tok, r["text"]) for r in data["domain_docs"]]
    qa = [encode_qa(tok, r["prompt"], r["completion"]) for r in data["domain_qa_teacher"]]
    # Profiles and QA share the "domain" side of the mixture in proportion to their weights.
    repeats = max(1, round(mix["domain_docs"] / mix["domain_qa_teacher"] * len(qa) / len(docs)))
    share = mix["domain_docs"] + mix["domain_qa_teacher"]
    teacher = tiny_causal_lm(len(tok), t.layers, t.hidden, seed=1)
    seconds = train(teacher, {"general": general, "domain": docs * repeats + qa},
                    (StageRecipe("teacher", recipe.teacher_steps, (share, share), alpha=1.0, temperature=1.0),),
                    lr=recipe.teacher_lr, batch=recipe.batch_size, warmup_ratio=recipe.warmup_ratio,
                    pad_id=tok.pad_token_id, seed=1)
    teacher.save_pretrained(path)
    (path / "train_s").write_text(str(seconds))
    return teacher, seconds, "trained"


def main() -> None:
    args = parse_args()
    recipe = recipe_from(args)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(recipe)

    data = build_demo_rows(args.quick)
    qa_texts = [f"{r['prompt']} {r['completion']}" for r in data["domain_qa_teacher"]]
    texts = [r["text"] for r in data["general_train"] + data["domain_docs"]] + qa_texts
    tok = train_tokenizer(texts, recipe.vocab_size)
    enc = {"general_eval": [encode_text(tok, r["text"]) for r in data["general_eval"]],
           "domain_eval": [encode_qa(tok, r["prompt"], r["completion"]) for r in data["domain_eval"]]}
    general = [encode_text(tok, r["text"]) for r in data["general_train"]]
    qa_lab = [encode_qa(tok, r["prompt"], r["completion"]) for r in data["domain_qa_labelled"]]
    print(f"data+tokenizer {time.perf_counter() - t0:.1f}s; vocab {len(tok)}")
    print("model | params_M | steps | train_s | EM_all | EM_labelled | EM_unlabelled | dom_ppl | gen_ppl | eval_s")

    teacher, t_seconds, how = train_teacher(recipe, tok, data, general, Path(args.cache), args.quick)
    teacher.requires_grad_(False)
    t = recipe.teacher
    evaluate(f"teacher {t.layers}x{t.hidden}", teacher, tok, data, enc, t_seconds, str(recipe.teacher_steps),
             recipe.max_new_tokens)

    start = time.perf_counter()
    prompts = [r["prompt"] for r in data["domain_prompts_unlabelled"]]
    answers = greedy_answers(teacher, tok, prompts, recipe.max_new_tokens)
    teacher_rows = [encode_qa(tok, p, a) for p, a in zip(prompts, answers)]
    label_s = time.perf_counter() - start
    print(f"teacher answered {len(prompts)} unlabelled prompts in {label_s:.1f}s")

    s = recipe.student
    steps = ",".join(str(st.steps) for st in recipe.stages)
    common = dict(lr=recipe.student_lr, batch=recipe.batch_size, warmup_ratio=recipe.warmup_ratio,
                  pad_id=tok.pad_token_id, seed=2)
    baseline = tiny_causal_lm(len(tok), s.layers, s.hidden, seed=2)
    b_seconds = train(baseline, {"general": general, "domain": qa_lab}, recipe.stages, **common)
    evaluate(f"baseline {s.layers}x{s.hidden} CE", baseline, tok, data, enc, b_seconds, steps, recipe.max_new_tokens)
    student = tiny_causal_lm(len(tok), s.layers, s.hidden, seed=2)
    s_seconds = train(student, {"general": general, "domain": qa_lab + teacher_rows}, recipe.stages,
                      teacher=teacher, **common)
    evaluate(f"distilled {s.layers}x{s.hidden}", student, tok, data, enc, s_seconds + label_s, steps,
             recipe.max_new_tokens)
    print(f"total wall {time.perf_counter() - t0:.0f}s, process CPU {time.process_time():.0f}s (teacher {how})")


if __name__ == "__main__":
    main()
