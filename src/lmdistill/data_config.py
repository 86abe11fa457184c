"""Data settings of the pipeline config: the training and eval sources, and how a stage mixes them (weights, a
schedule, evaluation-driven reweighting). Re-exported by `lmdistill.config`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmdistill.data.columns import ROLES as COLUMN_ROLES
from lmdistill.loss_config import Strict


# --------------------------------------------------------------------------------------------------- data
class SourceSettings(Strict):
    path: str = Field(description="File, folder, datasets save_to_disk folder, or hub dataset name.")
    format: Literal["auto", "text", "alpaca", "pair", "prompt", "dolly", "chat", "sharegpt", "seq2seq"] = "auto"
    layout: Literal["auto", "chat", "completion"] = Field(
        "auto", description="How a causal model sees the rows. chat: the tokenizer's chat template (or the plain "
        "'### User:' template when it has none). completion: a base model continuing the text verbatim, the prompt "
        "and its completion joined as written, BOS as the tokenizer adds it, no template. auto: completion for plain "
        "text and prompt-only rows when the tokenizer has no chat template, and for files written by `lmdistill "
        "generate`; chat otherwise.")
    split: str = "train"
    max_rows: int | None = Field(None, gt=0)
    columns: dict[Literal[COLUMN_ROLES], str] = Field(
        default_factory=dict, description="Role -> your column name, e.g. {prompt: context, response: target}: "
                                          "the columns are renamed before the format is detected.")


class DataSettings(Strict):
    sources: dict[str, SourceSettings] = Field(default_factory=dict, description="Named training sources.")
    eval: dict[str, SourceSettings] = Field(default_factory=dict, description="Named evaluation sets.")
    max_length: int = Field(512, gt=8)
    strict: bool = Field(False, description="Fail on the first bad row instead of skipping and counting it.")
    eval_max_rows: int | None = Field(256, gt=0, description="Cap on rows per eval set (None: all).")
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="Assistant turns of a chat that are trained on: every one, or the last only "
                                     "(earlier turns are then context).")
    text_overlap: int = Field(0, ge=0, description="Tokens shared by consecutive windows of a plain text longer "
                                                   "than max_length (the repeats are context, not trained twice).")
    tokenized_cache: bool = Field(True, description="Keep tokenised sources on disk, keyed by data, tokenizer, "
                                                    "template and layout options, so re-runs do not tokenise again.")
    cache_dir: str | None = Field(None, description="Folder of the tokenised-source cache (default: "
                                                    "$LMDISTILL_CACHE_DIR or ~/.cache/lmdistill/tokenized).")
    num_proc: int = Field(1, ge=1, description="Processes that tokenise a source (datasets.map num_proc); the "
                                               "tokenizer already batches over threads, so 1 is often enough.")
    eval_holdout: float = Field(
        0.05, ge=0, lt=1, description="When `eval` is empty: the share of each training source held out (never "
        "trained on) as its eval set, at most eval_max_rows rows, the same rows on every run; 0: no evaluation.")


# ------------------------------------------------------------------------------------------- stage mixtures
class ScheduleSettings(Strict):
    kind: Literal["constant", "linear", "cosine"] = "linear"
    source: str = Field(description="The source whose share follows the schedule.")
    start: float = Field(ge=0, le=1)
    end: float = Field(ge=0, le=1)


class MixtureSettings(Strict):
    weights: dict[str, float] = Field(default_factory=dict, description="Source name -> relative weight; none: "
                                      "every source in proportion to its rows (an epoch reads every row once).")
    schedule: ScheduleSettings | None = None


class EvalDrivenSettings(Strict):
    enabled: bool = True
    sharpness: float = Field(1.0, gt=0)
    min_weight: float = Field(0.05, ge=0, lt=1)
