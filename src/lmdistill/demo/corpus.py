"""The embedded demo's data set, generated on demand and written as JSONL files like any user data.

The task poses the case where distillation pays: the teacher has seen the finance facts of every company
(documents and labelled QA), while the student's labelled QA covers only a small share of the companies.
The rest come as unlabelled prompts that the teacher can answer. Evaluation asks about every company with
held-out question phrasings, so it measures what a model knows, not which strings it has seen.

Files written by `write_demo_data` (one JSON object per line):
  general_train, general_eval     {"text"}                 everyday stories (perplexity, tokenizer)
  domain_docs                     {"text"}                 company profiles, all companies (teacher data)
  domain_qa_teacher               {"prompt","completion"}  training phrasings, all companies (teacher data)
  domain_qa_labelled              {"prompt","completion"}  training phrasings, labelled companies only
  domain_prompts_unlabelled       {"prompt"}               training phrasings, the other companies
  domain_eval                     {"prompt","completion"}  held-out phrasings, one per company and attribute
  domain_facts                    the fact table, plus "labelled" (bool) per company
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from lmdistill.demo.finance import TRAIN_TEMPLATES, documents, heldout_questions, make_companies, qa_pairs
from lmdistill.demo.general_text import general_texts

SEED = 20240917


@dataclass(frozen=True)
class DemoSizes:
    """How much data the demo generates; `quick` is the CI variant."""

    companies: int
    labelled_companies: int
    docs_per_company: int
    general_train: int
    general_eval: int


FULL = DemoSizes(companies=100, labelled_companies=20, docs_per_company=2, general_train=3000, general_eval=200)
QUICK = DemoSizes(companies=60, labelled_companies=12, docs_per_company=2, general_train=1200, general_eval=100)


def demo_sizes(quick: bool) -> DemoSizes:
    return QUICK if quick else FULL


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    # Fixed key order and ASCII escapes make the bytes identical across runs and platforms.
    path.write_text("".join(json.dumps(row, ensure_ascii=True, sort_keys=True) + "\n" for row in rows),
                    encoding="utf-8")
    return path


def build_demo_rows(quick: bool) -> dict[str, list[dict]]:
    """All demo data sets as lists of rows, keyed by the names `write_demo_data` uses for its files."""
    sizes = demo_sizes(quick)
    rng = random.Random(SEED)
    companies = make_companies(sizes.companies, seed=SEED + 1)
    # Which companies are labelled is a random draw, so that labelled ones are no different from the rest.
    labelled = set(rng.sample(range(sizes.companies), sizes.labelled_companies))

    general = general_texts(sizes.general_train + sizes.general_eval, seed=SEED + 2)
    docs = [{"text": d} for c in companies for d in documents(c, rng, sizes.docs_per_company)]
    qa_teacher = [row for c in companies for row in qa_pairs(c, TRAIN_TEMPLATES)]
    qa_labelled = [row for i, c in enumerate(companies) if i in labelled for row in qa_pairs(c, TRAIN_TEMPLATES)]
    prompts = [{"prompt": row["prompt"]} for i, c in enumerate(companies) if i not in labelled
               for row in qa_pairs(c, TRAIN_TEMPLATES)]
    for rows in (docs, qa_teacher, qa_labelled, prompts):
        rng.shuffle(rows)
    return {
        "general_train": [{"text": t} for t in general[:sizes.general_train]],
        "general_eval": [{"text": t} for t in general[sizes.general_train:]],
        "domain_docs": docs,
        "domain_qa_teacher": qa_teacher,
        "domain_qa_labelled": qa_labelled,
        "domain_prompts_unlabelled": prompts,
        "domain_eval": [row for c in companies for row in heldout_questions(c, rng)],
        "domain_facts": [asdict(c) | {"labelled": i in labelled} for i, c in enumerate(companies)],
    }


def write_demo_data(out_dir: str | Path, quick: bool = False) -> dict[str, Path]:
    """Generate the demo's data sets into `out_dir` (created if missing) as `<name>.jsonl` files.

    Returns the path of each file by name (see the module docstring). The same `quick` gives the same bytes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {name: _write_jsonl(out / f"{name}.jsonl", rows) for name, rows in build_demo_rows(quick).items()}
