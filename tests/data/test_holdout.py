"""With no eval set, a fixed share of each training source is held out for evaluation and never drawn for training."""

from transformers import AutoTokenizer

from lmdistill.config import config_from_dict
from lmdistill.data.holdout import split_holdout
from lmdistill.data.mixture import split_example_id
from lmdistill.train.prepare import load_data
from lmdistill.train.stage import build_train_dataset


def test_split_is_seeded_capped_and_disjoint():
    rows = [{"row_id": i} for i in range(100)]
    train, held = split_holdout(rows, 0.05, None, seed=42, name="general")
    assert len(held) == 5 and len(train) == 95
    assert {r["row_id"] for r in train}.isdisjoint(r["row_id"] for r in held)
    assert split_holdout(rows, 0.05, None, seed=42, name="general") == (train, held)  # the same rows every run
    assert split_holdout(rows, 0.05, None, seed=42, name="domain")[1] != held  # each source its own draw
    assert len(split_holdout(rows, 0.5, 7, seed=42, name="general")[1]) == 7  # capped
    assert split_holdout(rows[:19], 0.05, None, seed=42, name="general") == (rows[:19], [])  # under one row


def test_held_out_rows_are_never_drawn_for_training(tmp_path, tokenizer_dir, text_jsonl, qa_jsonl):
    config = config_from_dict({
        "data": {"max_length": 32, "sources": {"general": {"path": str(text_jsonl)}, "domain": {"path": str(qa_jsonl)}},
                 "eval_holdout": 0.1},
        "stages": [{"name": "s", "epochs": 3, "mixture": {"weights": {"general": 1.0, "domain": 1.0}}}]})
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sources, eval_sets, report = load_data(config, tokenizer, "causal")
    assert {name: len(rows) for name, rows in eval_sets.items()} == {"general": 20, "domain": 20}
    assert report["general"]["held_out"] == 20 and len(sources["general"]) == 180
    dataset = build_train_dataset(config, config.stages[0], sources)
    drawn = {(dataset.names[source], row) for source, row in
             (split_example_id(dataset[i]["example_id"]) for i in range(len(dataset)))}
    held = {(name, ex["row_id"]) for name, rows in eval_sets.items() for ex in rows}
    assert drawn and drawn.isdisjoint(held)
    with_eval = config.model_copy(update={"data": config.data.model_copy(
        update={"eval": {"domain": config.data.sources["domain"]}})})
    sources, eval_sets, _ = load_data(with_eval, tokenizer, "causal")
    assert len(sources["general"]) == 200 and list(eval_sets) == ["domain"]  # a named eval set: nothing held out


def test_a_rows_windows_stay_on_one_side():
    rows = [{"row_id": 10 + i, "part": part} for i in range(40) for part in range(3)]  # 40 rows of 3 windows
    train, held = split_holdout(rows, 0.1, None, seed=1, name="text")
    assert len(held) == 12 and len(train) == 108
    starts = [i for i, ex in enumerate(held) if ex["part"] == 0]
    assert starts == list(range(0, 12, 3)) and [ex["part"] for ex in held] == [0, 1, 2] * 4
