"""The typed config for a whole pipeline: loaded from YAML or JSON, validated at load, saved as run.

Layering: class defaults, then the file, then CLI overrides (`apply_overrides`). Unknown keys and wrong types fail
at load with the key path, e.g. `stages[1].temperature: Input should be a valid number, got 'hot' (...)`. Types
are strict: `batch_size: "8"`, `fp16: "yes"` and `temperature: true` are errors, not silently converted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lmdistill.data_config import (DataSettings, EvalDrivenSettings, MixtureSettings, ScheduleSettings,  # noqa: F401
                                   SourceSettings)
from lmdistill.errors import ConfigError
from lmdistill.loss_config import (_LOSS_TAGS, LOGIT_LOSS_NAMES, AttentionTerm, ContrastiveTerm, CrossVocabTerm,  # noqa: F401
                                   FeatureTerm, LogitTerm, LossTermSettings, Strict)
from lmdistill.model_config import (FromTeacher, LoraSettings, ModelSettings, Quantization,  # noqa: F401
                                    StageStudent, StageTeacher, StudentSettings, TeacherEntry, TeacherSettings)


# --------------------------------------------------------------------------------------------------- stages
class AdaptiveOffPolicySettings(Strict):
    """DistiLLM's adaptive off-policy schedule: the share of student-generated batches starts at `start` and rises by
    `step` (up to `max`) after each evaluation whose `metric` did not fall below the best so far by `min_delta`."""

    start: float = Field(0.0, ge=0, le=1, description="Share of student-sampled batches before any evaluation.")
    step: float = Field(0.1, gt=0, le=1, description="Added to the share after an evaluation that did not improve.")
    max: float = Field(1.0, gt=0, le=1, description="The share never rises above this.")
    min_delta: float = Field(0.0, ge=0, description="An evaluation improves when it beats the best by more than this.")
    metric: str = Field("eval_loss", description="The evaluation loss watched (a lower-is-better metric).")

    @model_validator(mode="after")
    def _order(self):
        if self.start > self.max:
            raise ValueError(f"adaptive.start ({self.start}) is above adaptive.max ({self.max}); lower start or raise "
                             "max")
        return self


class OnPolicySettings(Strict):
    """A `kind: policy` stage (GKD). Sampling settings (temperature, top_k, top_p, max_new_tokens) come from `generation:`."""

    lmbda: float = Field(0.5, ge=0, le=1, description="Probability per batch that the student samples completions.")
    seq_kd: bool = Field(False, description="When not on-policy, the teacher samples the completions instead of the "
                                            "batch's own responses (sequence-level KD).")
    replay_size: int = Field(0, ge=0, description="DistiLLM-style replay: student sample batches kept for reuse "
                                                  "(0: no replay).")
    replay_ratio: float = Field(0.5, ge=0, lt=1, description="Share of on-policy batches taken from the replay "
                                                             "buffer instead of sampled anew (when it is not empty).")
    adaptive: AdaptiveOffPolicySettings | None = Field(
        None, description="DistiLLM: replace the fixed lmbda by a share that rises when validation loss stops "
        "falling (needs eval data and eval_steps on the stage).")


class StageSettings(Strict):
    name: str
    kind: Literal["distill", "finetune", "non_policy", "policy"] = "distill"
    epochs: float | None = Field(None, gt=0, description="Passes over the stage's sources, each row once per pass "
                                                      "(reshuffled every pass); default 1 unless max_steps.")
    max_steps: int | None = Field(None, gt=0)
    learning_rate: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, gt=0, description="KD temperature inside the loss (T^2 scaling applied).")
    alpha: float | None = Field(
        None, ge=0, le=1, description="The hard-label CE weight of alpha*CE + (1-alpha)*KD, as in classic KD "
        "scripts. CE = cross_entropy at its own weight (added at weight 1 when not listed); KD = every listed KD term "
        "at its own weight (default 1): no term is dropped and written weights stay factors. In a non_policy/policy "
        "stage that also sets beta (as the strong-to-weak Qwen3 scripts do): alpha*KD + beta*CE.")
    beta: float | None = Field(
        None, ge=0, le=1, description="non_policy/policy stages, with alpha (as the strong-to-weak Qwen3 scripts): "
        "the CE weight, and alpha the KD weight: alpha*KD + beta*CE, each side read as for alpha alone.")
    losses: list[LossTermSettings] = Field(default_factory=lambda: [LogitTerm(name="forward_kl")])
    balance: Literal["none", "loss_scale", "gradnorm"] = Field(
        "none", description="Reweighs the loss terms on training steps: loss_scale by each term's running magnitude, "
        "gradnorm by GradNorm on the student's last layer. Evaluation (eval_loss, best/) uses the plain weighted sum; "
        "the balancer's state is saved with each checkpoint.")
    mixture: MixtureSettings = Field(default_factory=MixtureSettings)
    eval_driven_sampling: EvalDrivenSettings | None = None
    teacher_source: Literal["live", "cache", "generations"] = "live"
    onpolicy: OnPolicySettings | None = None
    chunk_size: int | None = Field(None, gt=0, description="Tokens per loss chunk (memory bound) with fused: true "
                                   "(None: from a 256 MiB budget) or a top-k teacher (cache or server); the other logit "
                                   "losses need none (they write their gradient out in small row blocks).")
    fused: bool = Field(False, description="Compute logits inside the loss chunk by chunk (full logits never exist).")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N optimizer steps; unset: at every "
                                                          "save_steps, else at the end of each epoch.")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N optimizer steps; unset: "
                                                          "training.save_every, else at the end of each epoch.")
    metric_for_best: str = "eval_loss"
    teacher: StageTeacher | None = Field(None, description="This stage's teacher instead of the run's (chains, "
                                                          "self-distillation).")
    student: StageStudent | None = Field(None, description="This stage's student built from its teacher instead of "
                                                          "continuing the previous stage's.")

    @model_validator(mode="after")
    def _rules(self):
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        if self.kind == "finetune":
            bad = [t.name for t in self.losses if t.name != "cross_entropy"]
            if bad:
                raise ValueError(f"a finetune stage trains on cross_entropy only; remove {bad} or use kind: distill")
        if self.beta is not None and (self.kind not in ("non_policy", "policy") or self.alpha is None):
            raise ValueError("beta (the CE weight, as in main_distillation.py) goes with alpha (then the KD weight) in a "
                             "non_policy or policy stage; elsewhere use named loss weights")
        if self.alpha is not None and self.beta is None and self.kind in ("non_policy", "policy"):
            raise ValueError("alpha alone is ambiguous in a non_policy/policy stage (the CE weight in finetune_cli.py, "
                             "the KD weight in main_distillation.py): add beta (then alpha=KD, beta=CE, as in "
                             "main_distillation.py) or use named loss weights")
        if self.onpolicy is not None and self.onpolicy.adaptive is not None and (
                self.kind != "policy" or self.eval_steps is None):
            raise ValueError("onpolicy.adaptive raises the student-sample share at each evaluation: it needs kind: "
                             "policy and eval_steps on the stage (and data.eval)")
        if self.kind == "policy" and self.teacher_source != "live":
            raise ValueError("a policy stage scores the student's own samples, so it needs teacher_source: live")
        if self.kind == "non_policy" and self.teacher_source == "cache":
            raise ValueError("a non_policy stage trains on teacher generations, which the top-k cache does not cover; "
                             "use teacher_source: live (the teacher scores the generations as it trains)")
        cross = [t.name for t in self.losses if isinstance(t, CrossVocabTerm)]
        if cross and (self.kind != "distill" or self.teacher_source == "generations" or self.fused):
            raise ValueError(f"{cross[0]} reads the teacher on its own tokens beside the student: it needs kind: "
                             "distill, teacher_source: live or cache, and fused: false")
        kd = [t.name for t in self.losses if isinstance(t, LogitTerm) and t.name != "cross_entropy"]
        if cross and kd and self.teacher_source == "cache":
            raise ValueError(f"a teacher cache for {cross[0]} holds the teacher's top-k over its own ids, which "
                             f"{kd[0]} cannot compare with the student's: keep cross_entropy beside {cross[0]}, or "
                             "use teacher_source: live")
        if cross and any(not isinstance(t, (LogitTerm, CrossVocabTerm)) for t in self.losses):
            raise ValueError(f"{cross[0]} goes with logit losses only: hidden-state terms compare positions one by "
                             "one, which two tokenizers do not share")
        if self.alpha is not None:
            if not any(t.name not in ("cross_entropy",) and isinstance(t, LogitTerm) for t in self.losses):
                raise ValueError("alpha weighs CE against a KD term, but the stage lists no logit KD term")
        return self


# --------------------------------------------------------------------------------------------------- training
class TrainingSettings(Strict):
    """Defaults every stage inherits unless the stage sets its own value."""

    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(8, gt=0)
    eval_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    optimizer: Literal["adamw", "sgd", "adafactor"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    clip_grad_norm: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    fp16: bool = False
    bf16: bool = False
    no_cuda: bool = Field(False, description="Train on CPU even when CUDA is present.")
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    save_every: int | None = Field(None, gt=0, description="Save a checkpoint every N steps (per stage).")
    save_total_limit: int | None = Field(2, gt=0)
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=lambda: ["tensorboard"])
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, "
                                                            "about a third more compute.")
    torch_compile: bool = Field(False, description="Compile the student with torch.compile (Trainer's torch_compile).")
    dataloader_num_workers: int = Field(0, ge=0, description="Processes preparing batches (0: the training process).")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON config file, as Trainer's --deepspeed takes it "
                                                    "(or launch with an accelerate DeepSpeed config instead).")
    patience: int | None = Field(None, gt=0, description="Early stopping: end a stage after this many evaluations "
                                                         "without improving its metric_for_best (None: never).")
    extra_args: dict[str, Any] = Field(default_factory=dict, description="Any other transformers.TrainingArguments "
                                       "field, passed as given, e.g. {dataloader_pin_memory: false}.")

    @model_validator(mode="after")
    def _precision(self):
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 are exclusive; choose one")
        return self

    @field_validator("extra_args")
    @classmethod
    def _known_training_arguments(cls, extra: dict[str, Any]) -> dict[str, Any]:
        if extra:
            import dataclasses
            import difflib

            from transformers import TrainingArguments

            known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
            for key in extra:
                if key not in known:
                    close = difflib.get_close_matches(key, known, n=1)
                    hint = f"did you mean {close[0]!r}?" if close else "see transformers.TrainingArguments"
                    raise ValueError(f"{key!r} is not a TrainingArguments field; {hint}")
        return extra


class GenerationSettings(Strict):
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (not the KD temperature).")
    top_k: int = Field(0, ge=0, description="Sample from the k most likely tokens only; 0: no top-k truncation (not "
                                             "transformers' default of 50, nor the model's generation_config).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens holding this "
                                                       "probability; 1.0: no truncation.")
    max_new_tokens: int = Field(64, gt=0)
    do_sample: bool = True
    thinking_prob: float | None = Field(
        None, ge=0, le=1, description="Share of prompts answered in thinking mode (the mode is chosen per row and "
                                      "recorded); None: prompts as they are. Templates taking enable_thinking (Qwen3) "
                                      "get it; others get the thinking_system / non_thinking_system text.")
    thinking_system: str = Field("/think", description="System text (plain prefix without a chat template) that "
                                                       "asks for thinking mode; default: Qwen3's soft switch.")
    non_thinking_system: str = Field("/no_think", description="System text that asks for non-thinking mode.")
    path: str | None = Field(None, description="JSONL of teacher generations (`lmdistill generate` writes it, "
                                               "teacher_source: generations trains on it); None: OUTPUT_DIR/generations.jsonl.")
    sources: list[str] | None = Field(None, description="Training sources whose prompts are answered (None: all).")
    text_prompt_fraction: float = Field(
        0.5, gt=0, lt=1, description="Plain-text rows have no prompt: this share of each text's tokens is the prompt "
        "the teacher continues (`generate`) and a policy stage's student samples from, and the held-out prefix the "
        "models continue in evaluation (samples, ROUGE-L against the rest of the text).")
    text_prompt_tokens: int | None = Field(
        None, gt=0, description="Instead of a share, the first N tokens of each text as its prompt (at most all "
                                "but its last token).")
    num_samples: int = Field(1, gt=0, description="Generations per prompt when sampling; greedy decoding "
                                                  "(do_sample: false) gives each prompt one.")
    batch_size: int = Field(8, gt=0, description="Prompts per teacher generate() call.")


class TeacherCacheSettings(Strict):
    """The offline teacher (`lmdistill cache-teacher`, stages with teacher_source: cache)."""

    path: str | None = Field(None, description="Cache folder; None: OUTPUT_DIR/teacher_cache.")
    k: int = Field(64, gt=0, description="Teacher log-probs kept per token (the k most likely ids); also what a "
                   "served teacher (teacher.endpoint) returns to stages that score against it as they train.")
    temperature: float = Field(1.0, gt=0, description="Capture temperature: log-softmax(logits / T) is stored.")
    tail: Literal["bucket", "drop"] = Field(
        "bucket", description="bucket: the mass outside the top k is one extra class; drop: renormalise over the k.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="Storage dtype of log-probs.")
    batch_size: int = Field(8, gt=0, description="Examples per teacher forward pass while capturing.")
    shard_examples: int = Field(1024, gt=0, description="Examples per shard (the unit of resume).")


class EvaluationSettings(Strict):
    enabled: bool = Field(True, description="Score teacher and student on the eval sets before and after the stages.")
    num_samples: int = Field(4, ge=0, description="Eval prompts answered by teacher and student side by side at "
                                                  "every evaluation (samples.jsonl, log, TensorBoard).")
    max_prompts: int = Field(32, ge=0, description="Eval prompts answered greedily for ROUGE-L / exact match.")
    measure_speed: bool = Field(True, description="Time generation (tokens/s at batch 1 and 8) for each model.")
    report: bool = Field(True, description="Write report.html at the end of the run.")


class PipelineConfig(Strict):
    task_type: Literal["auto", "causal", "seq2seq"] = "auto"
    teacher: TeacherSettings = Field(default_factory=TeacherSettings)
    teachers: list[TeacherEntry] | None = Field(
        None, description="Several teachers in place of `teacher`: the target is their weighted mixture (or one per "
                          "example by source routing); the first is also the teacher scored in evaluation.")
    student: StudentSettings = Field(default_factory=StudentSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    stages: list[StageSettings]
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    teacher_cache: TeacherCacheSettings = Field(default_factory=TeacherCacheSettings)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    output_dir: str = "./lmdistill_output"

    @field_validator("stages")
    @classmethod
    def _stages(cls, stages):
        if not stages:
            raise ValueError("the stage list is empty; add at least one stage (see `lmdistill init --preset simple`)")
        names = [s.name for s in stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"stage names must be unique; repeated: {dupes}")
        return stages

    @model_validator(mode="after")
    def _references(self):
        known = set(self.data.sources)
        for i, stage in enumerate(self.stages):
            for src in list(stage.mixture.weights) + ([stage.mixture.schedule.source] if stage.mixture.schedule else []):
                if src not in known:
                    raise ValueError(f"stages[{i}].mixture names source {src!r}, but data.sources has {sorted(known)}")
            if stage.onpolicy is not None and stage.onpolicy.adaptive is not None and not self.data.eval:
                raise ValueError(f"stages[{i}].onpolicy.adaptive watches the validation loss, but data.eval is empty; "
                                 "give data.eval a held-out set")
        return self

    @model_validator(mode="after")
    def _teachers(self):
        from lmdistill.teacher.chain_rules import check_teachers

        primary = check_teachers(self)
        if primary is not None and self.teacher.name is None:
            # The first teacher stands for `teacher` wherever one model is meant (vocabulary, evaluation, samples).
            self.teacher = primary
        return self

    @model_validator(mode="after")
    def _bf16_teacher(self):
        # bf16 training: the frozen teacher runs in bf16 as well (half its memory, bf16 matmuls) unless teacher.dtype
        # is set; resolved here so that the saved config (and a resume from it) records the dtype used.
        if self.training.bf16 and "dtype" not in self.teacher.model_fields_set and self.teacher.quantization is None:
            self.teacher = self.teacher.model_copy(update={"dtype": "bfloat16"})
            self.teacher.model_fields_set.add("dtype")
        return self

    @property
    def needs_teacher(self) -> bool:
        # A stage with a teacher of its own (an earlier stage's student, an EMA of the student) needs no run teacher.
        return any(stage.kind != "finetune" and stage.teacher is None for stage in self.stages)

    def stage_value(self, stage: StageSettings, key: str) -> Any:
        """A stage's own value, or the training default when the stage leaves it unset."""
        value = getattr(stage, key)
        return getattr(self.training, key) if value is None else value


# --------------------------------------------------------------------------------------------------- load / save
# The resolved config a run writes into its output directory (and an export into the model folder).
CONFIG_FILE = "lmdistill_config.yaml"

_TYPE_ERRORS = {"int_type", "float_type", "bool_type"}


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path, previous = "", None
    for part in first["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(previous, int) and part in _LOSS_TAGS:
            pass  # the union member pydantic tried (a loss name): noise for a user
        else:
            path += f".{part}" if path else str(part)
        previous = part
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] in _TYPE_ERRORS and isinstance(first.get("input"), (str, bool)):
        # Strict types: YAML's "8" and true stay text and a boolean (no silent coercion); say how to write the value.
        msg += f", got {json.dumps(first['input'])} (write numbers unquoted, and true/false for yes/no switches)"
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `lmdistill init` writes every key with comments)"
    more = len(err.errors()) - 1
    return f"{source}: {path or '<root>'}: {msg}" + (f" (and {more} more problem(s))" if more else "")


def config_from_dict(data: dict, source: str = "config") -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (create one with `lmdistill init --preset simple -o {path}`)")
    text = path.read_text(encoding="utf-8")
    try:
        # YAML 1.1 reads `5e-5` as a string; 1.2 (and JSON) read it as a number. We load with a resolver that
        # follows 1.2 here so a learning rate written the way everyone writes it is a number.
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Yaml12Loader)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot parse: {str(err).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    return data


def load_config(path: str | Path) -> PipelineConfig:
    return config_from_dict(read_config_file(path), source=str(path))


def save_config(config: PipelineConfig, path: str | Path) -> None:
    path = Path(path)
    data = config.model_dump(mode="json", exclude_none=True)
    text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


class _Yaml12Loader(yaml.SafeLoader):
    pass


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|^[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)

