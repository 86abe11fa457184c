"""A policy stage over plain text: its student samples from the first part of each text (as `generate` prompts the
teacher, generation.text_prompt_fraction), the rest being the row's response."""

import json
import math

from lmdistill.config import GenerationSettings, config_from_dict
from lmdistill.data.collate import DistillCollator
from lmdistill.data.completion import text_prompt_length
from lmdistill.data.tokenize import IGNORE_INDEX, encode_rows
from lmdistill.train.onpolicy import batch_prompts, policy_sources
from lmdistill.train.pipeline import run_pipeline

TEXT = "The bank reports higher yields today, and the trader sells bonds before the market closes."


def test_a_text_row_is_prompted_with_the_first_part_of_its_text(tokenizer):
    rows = [{"text": TEXT, "row_id": 0}, {"prompt": "What does the bank report?", "response": "Higher yields.",
                                          "row_id": 1}]
    text, pair = encode_rows(rows, tokenizer, max_length=64).examples
    (prompted_text, prompted_pair), = policy_sources({"mixed": [text, pair]},
                                                     GenerationSettings(text_prompt_fraction=0.25), "gkd").values()
    cut = text_prompt_length(text, 0.25)
    assert prompted_pair is pair
    assert prompted_text["input_ids"] == text["input_ids"] and prompted_text["prompt_length"] == cut > 0
    assert prompted_text["labels"] == [IGNORE_INDEX] * cut + text["labels"][cut:]
    batch = DistillCollator(tokenizer.pad_token_id)([prompted_text, prompted_pair])
    assert batch_prompts(batch) == [text["input_ids"][:cut], pair["input_ids"][:pair["prompt_length"]]]


def test_a_policy_stage_trains_on_a_plain_text_source(tiny_pipeline):
    stage = {"name": "gkd", "kind": "policy", "max_steps": 2, "losses": [{"name": "reverse_kl"}],
             "mixture": {"weights": {"general": 1.0}}, "onpolicy": {"lmbda": 1.0}}
    data = tiny_pipeline([stage], evaluation={"enabled": False, "report": False})
    history = json.loads((run_pipeline(config_from_dict(data)) / "gkd" / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2 and all(math.isfinite(h["loss"]) and h["onpolicy/student_share"] == 1.0 for h in steps)
