"""Config entries for loss terms (`stages[i].losses`), one class per family, told apart by `name`."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic import Strict as StrictTypes

LOGIT_LOSS_NAMES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "cross_entropy")


class Strict(BaseModel):
    """Base of every config class: unknown keys are errors, values of the wrong type too (`batch_size: "8"`,
    `fp16: "yes"`, `temperature: true`; an integer is still a valid float), and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


# A layer pair as YAML and JSON write it (a list of two ints); strict mode alone would accept only a Python tuple.
LayerPair = Annotated[tuple[int, int], StrictTypes(False)]


class LogitTerm(Strict):
    name: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "cross_entropy"]
    weight: float = Field(1.0, ge=0)
    beta: float | None = Field(None, ge=0, le=1, description="jsd only: interpolation (0 -> forward KL, 1 -> reverse).")
    skew: float | None = Field(None, gt=0, lt=1, description="skew_kl / skew_reverse_kl only: DistiLLM's mixing alpha.")

    @model_validator(mode="after")
    def _params_belong(self):
        if self.beta is not None and self.name != "jsd":
            raise ValueError(f"beta applies to jsd only, not {self.name}")
        if self.skew is not None and self.name not in ("skew_kl", "skew_reverse_kl"):
            raise ValueError(f"skew applies to skew_kl/skew_reverse_kl only, not {self.name}")
        return self

    def params(self) -> dict[str, float]:
        if self.name == "jsd":
            return {"beta": 0.5 if self.beta is None else self.beta}
        if self.name in ("skew_kl", "skew_reverse_kl"):
            return {"alpha": 0.1 if self.skew is None else self.skew}
        return {}


class FeatureTerm(Strict):
    name: Literal["feature"]
    weight: float = Field(0.1, ge=0)
    kind: Literal["mse", "cosine"] = "mse"
    layers: Literal["uniform"] | list[LayerPair] = Field(
        "uniform", description="'uniform' or explicit [[student_layer, teacher_layer], ...] (0-based, embeddings excluded).")


def _distinct_sides(sides: list[str] | None) -> list[str] | None:
    if sides is not None and len(set(sides)) != len(sides):
        raise ValueError(f"sides {sides} repeat a side; list each once")
    return sides


class AttentionTerm(Strict):
    name: Literal["attention"]
    weight: float = Field(0.05, ge=0)
    layers: Literal["uniform"] | list[LayerPair] = "uniform"
    heads: Literal["auto", "average", "group"] = Field(
        "auto", description="Differing head counts: 'group' when one divides the other, else 'average' (auto).")
    sides: list[Literal["encoder", "decoder", "cross"]] | None = Field(
        None, min_length=1, description="Encoder-decoder models only: which attentions to match (encoder self, "
        "decoder self, decoder cross); the term is their mean. Unset: all three.")

    _sides = field_validator("sides")(_distinct_sides)


class ContrastiveTerm(Strict):
    name: Literal["contrastive"]
    weight: float = Field(0.05, ge=0)
    temperature: float = Field(0.1, gt=0)
    sides: list[Literal["encoder", "decoder"]] | None = Field(
        None, min_length=1, description="Encoder-decoder models only: pooled encoder and/or decoder states, one "
        "InfoNCE each; the term is their mean. Unset: both.")

    _sides = field_validator("sides")(_distinct_sides)


class CrossVocabTerm(Strict):
    """Logit KD between a teacher and a student with different tokenizers (teacher.tokenizer differs): the teacher
    reads its own tokenisation of each conversation and the two meet at byte-aligned positions
    (docs/cross_tokenizer.md)."""

    name: Literal["uld", "cross_vocab_kl"] = Field(
        description="uld: L1 between the sorted probability vectors (Universal Logit Distillation); cross_vocab_kl: "
        "forward KL over the tokens both vocabularies share, ULD on the rest (GOLD's hybrid).")
    weight: float = Field(1.0, ge=0)


_LOSS_TAGS = set(LOGIT_LOSS_NAMES) | {"feature", "attention", "contrastive", "uld", "cross_vocab_kl"}
LossTermSettings = Annotated[Union[LogitTerm, FeatureTerm, AttentionTerm, ContrastiveTerm, CrossVocabTerm],
                             Field(discriminator="name")]
