"""The demo's generated data: deterministic, the promised sizes, held-out phrasings really held out, and
every answer true to the fact table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmdistill.demo.corpus import build_demo_rows, demo_sizes, write_demo_data
from lmdistill.demo.finance import ATTRIBUTES, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, make_companies

EXPECTED_FILES = {"general_train", "general_eval", "domain_docs", "domain_qa_teacher", "domain_qa_labelled",
                  "domain_prompts_unlabelled", "domain_eval", "domain_facts"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module", params=[True, False], ids=["quick", "full"])
def demo(request, tmp_path_factory) -> tuple[bool, dict[str, Path]]:
    quick = request.param
    return quick, write_demo_data(tmp_path_factory.mktemp("demo"), quick=quick)


def company_of(prompt: str, names: list[str]) -> str:
    matches = [n for n in names if n in prompt]
    assert len(matches) == 1, (prompt, matches)
    return matches[0]


def template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{c}"), ".+"))


def test_same_bytes_twice(demo, tmp_path):
    quick, first = demo
    second = write_demo_data(tmp_path / "again", quick=quick)
    assert set(first) == set(second) == EXPECTED_FILES
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
        assert first[name].name == f"{name}.jsonl"


def test_sizes(demo):
    quick, paths = demo
    sizes = demo_sizes(quick)
    counts = {name: len(read_jsonl(path)) for name, path in paths.items()}
    per_company = len(ATTRIBUTES) * 5  # five training phrasings per attribute
    assert all(len(TRAIN_TEMPLATES[a]) == 5 for a in ATTRIBUTES)
    assert counts == {
        "general_train": sizes.general_train,
        "general_eval": sizes.general_eval,
        "domain_docs": sizes.companies * sizes.docs_per_company,
        "domain_qa_teacher": sizes.companies * per_company,
        "domain_qa_labelled": sizes.labelled_companies * per_company,
        "domain_prompts_unlabelled": (sizes.companies - sizes.labelled_companies) * per_company,
        "domain_eval": sizes.companies * len(ATTRIBUTES),
        "domain_facts": sizes.companies,
    }
    # Shipped nothing: generated files stay small.
    assert sum(p.stat().st_size for p in paths.values()) < 2_000_000
    if quick:
        assert sizes.companies < demo_sizes(False).companies


def test_row_layouts(demo):
    _, paths = demo
    layouts = {"general_train": {"text"}, "general_eval": {"text"}, "domain_docs": {"text"},
               "domain_qa_teacher": {"prompt", "completion"}, "domain_qa_labelled": {"prompt", "completion"},
               "domain_prompts_unlabelled": {"prompt"}, "domain_eval": {"prompt", "completion"}}
    for name, keys in layouts.items():
        for row in read_jsonl(paths[name]):
            assert set(row) == keys and all(isinstance(v, str) and v.strip() for v in row.values()), (name, row)


def test_heldout_phrasings_never_trained_on(demo):
    _, paths = demo
    train_templates = [t for a in ATTRIBUTES for t in TRAIN_TEMPLATES[a]]
    heldout_templates = [t for a in ATTRIBUTES for t in HELDOUT_TEMPLATES[a]]
    assert not set(train_templates) & set(heldout_templates)
    train_prompts = {r["prompt"] for name in ("domain_qa_teacher", "domain_qa_labelled", "domain_prompts_unlabelled")
                     for r in read_jsonl(paths[name])}
    eval_prompts = [r["prompt"] for r in read_jsonl(paths["domain_eval"])]
    assert not train_prompts & set(eval_prompts)
    train_patterns = [template_regex(t) for t in train_templates]
    heldout_patterns = [template_regex(t) for t in heldout_templates]
    for prompt in eval_prompts:
        assert not any(p.fullmatch(prompt) for p in train_patterns), prompt
        assert any(p.fullmatch(prompt) for p in heldout_patterns), prompt
    for prompt in train_prompts:
        assert any(p.fullmatch(prompt) for p in train_patterns), prompt


def test_answers_come_from_the_fact_table(demo):
    _, paths = demo
    facts = {f["name"]: f for f in read_jsonl(paths["domain_facts"])}
    names = list(facts)
    for name in ("domain_qa_teacher", "domain_qa_labelled", "domain_eval"):
        for row in read_jsonl(paths[name]):
            fact = facts[company_of(row["prompt"], names)]
            assert row["completion"] in {fact[a] for a in ATTRIBUTES}, (name, row)
    # Each eval question asks for the attribute its template is about, and every (company, attribute) once.
    asked = set()
    for row in read_jsonl(paths["domain_eval"]):
        company = company_of(row["prompt"], names)
        attribute = next(a for a in ATTRIBUTES
                         if any(template_regex(t).fullmatch(row["prompt"]) for t in HELDOUT_TEMPLATES[a]))
        assert row["completion"] == facts[company][attribute]
        asked.add((company, attribute))
    assert len(asked) == len(names) * len(ATTRIBUTES)
    for row in read_jsonl(paths["domain_docs"]):
        fact = facts[company_of(row["text"], names)]
        for a in ATTRIBUTES:
            assert fact[a].lower() in row["text"].lower(), (a, row)


def test_labelled_split_partitions_the_companies(demo):
    quick, paths = demo
    facts = read_jsonl(paths["domain_facts"])
    names = [f["name"] for f in facts]
    labelled = {f["name"] for f in facts if f["labelled"]}
    assert len(labelled) == demo_sizes(quick).labelled_companies
    lab_rows = {company_of(r["prompt"], names) for r in read_jsonl(paths["domain_qa_labelled"])}
    unl_rows = {company_of(r["prompt"], names) for r in read_jsonl(paths["domain_prompts_unlabelled"])}
    assert lab_rows == labelled and unl_rows == set(names) - labelled
    teacher_rows = {company_of(r["prompt"], names) for r in read_jsonl(paths["domain_qa_teacher"])}
    assert teacher_rows == set(names)


def test_companies_are_unambiguous():
    companies = make_companies(demo_sizes(False).companies, seed=7)
    names = [c.name for c in companies]
    assert len(set(names)) == len(names) and len({c.ceo for c in companies}) == len(companies)
    # No name inside another, so a prompt names exactly one company.
    assert not [(a, b) for a in names for b in names if a != b and a in b]
    assert make_companies(20, seed=7) == companies[:20]
    with pytest.raises(ValueError, match="unique CEOs"):
        make_companies(10_000, seed=7)


def test_general_text_is_varied_and_split():
    rows = build_demo_rows(quick=True)
    train = [r["text"] for r in rows["general_train"]]
    evals = [r["text"] for r in rows["general_eval"]]
    assert len(set(train)) == len(train)
    assert not set(train) & set(evals)
    words = {w.strip(".,").lower() for t in train for w in t.split()}
    assert len(words) > 150
