"""Model settings of the typed config: the teacher(s) and the student, their dtype, quantization, LoRA, and the
per-stage teacher/student of chains and self-distillation. Part of `lmdistill.config`, which re-exports them."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from lmdistill.loss_config import Strict


class Quantization(Strict):
    bits: Literal[4, 8] = Field(description="Load the teacher in 4-bit (nf4) or 8-bit through bitsandbytes.")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class LoraSettings(Strict):
    method: Literal["lora", "qlora", "adalora"] = Field(
        "lora", description="lora | qlora (LoRA on a 4-bit base: set student.quantization) | adalora (AdaLoRA: "
        "adapters start at rank 2r and the first stage reallocates them to an average of r over its max_steps)")
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (lora_alpha); unrelated to the CE weight alpha.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge_on_save: bool = Field(True, description="Merge adapters into the weights when exporting final/.")


class FromTeacher(Strict):
    """Build the student from the teacher by keeping a subset of its layers (a smaller student of the teacher's own architecture)."""

    keep_layers: list[int] | None = None
    num_layers: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.keep_layers is None) == (self.num_layers is None):
            raise ValueError("give exactly one of keep_layers (list of layer indices) or num_layers (evenly spaced)")
        return self


class ModelSettings(Strict):
    name: str | None = Field(None, description="Hub name or local folder (save_pretrained layout).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = Field("auto", description="'auto' (cuda when present, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    quantization: Quantization | None = None
    attn_implementation: Literal["eager", "sdpa"] | None = Field(
        None, description="Attention kernel; the attention loss needs 'eager' (set automatically when it is used).")
    trust_remote_code: bool = False


class LoadedTeacher(ModelSettings):
    """What every teacher loaded in this process has: the model, and how it spreads over the launched processes."""

    shard: Literal["auto", "always", "never"] = Field(
        "auto", description="Under several processes: 'auto' splits the teacher's weights over them when the student "
        "is sharded too (FSDP or DeepSpeed ZeRO-3), 'always' also next to a DDP student, 'never' keeps a whole copy "
        "per process (see docs/distributed.md).")


class TeacherSettings(LoadedTeacher):
    """The run's teacher (`teacher:`): loaded here, or asked on a server (endpoint)."""

    endpoint: str | None = Field(
        None, description="Base URL of an OpenAI-compatible server (vLLM) serving this teacher, e.g. "
        "http://127.0.0.1:8000/v1: `cache-teacher`, `generate` and the stages of `run` ask it (generations, samples, "
        "top-k log-probs: teacher_cache.k) instead of loading the teacher here (its tokenizer and config still load "
        "from `name`). See docs/serving_teacher.md.")
    endpoint_concurrency: int = Field(8, gt=0, description="Requests in flight to the endpoint at once.")
    endpoint_timeout: float = Field(300.0, gt=0, description="Seconds one endpoint request may take.")
    endpoint_retries: int = Field(4, ge=0, description="Retries of a failed endpoint request (server down, 5xx, "
                                  "timeout), with doubling backoff, before the command stops.")

    @field_validator("endpoint")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL such as http://127.0.0.1:8000/v1, not {value!r}")
        return value.rstrip("/") if value else value


class TeacherEntry(LoadedTeacher):
    """One of several teachers (`teachers:`): its distribution enters the stage's target at `weight`. The mixture
    runs its teachers in this process, so an entry has no endpoint (the first entry stands for `teacher:`)."""

    weight: float = Field(1.0, gt=0, description="Share in the mixture target (weights are normalised to sum 1).")
    sources: list[str] | None = Field(
        None, description="Routing: examples of these training sources are scored by this teacher alone; examples "
                          "of other sources get the weighted mixture of the teachers without sources.")

    @model_validator(mode="before")
    @classmethod
    def _loaded_here(cls, data):
        # Said in place of pydantic's "extra inputs are not permitted": what to do instead.
        if isinstance(data, dict) and any(str(key).startswith("endpoint") for key in data):
            raise ValueError("the teachers of a mixture are loaded in-process; only the run's teacher can be served "
                             "(teacher.endpoint)")
        return data


class StageTeacher(Strict):
    """A stage's own teacher in place of the run's: an earlier stage's student (chains, self-distillation) or an
    exponential moving average of the student being trained."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)  # saved as written: self: ema
    from_stage: str | None = Field(None, description="Name of an earlier stage whose best student is the teacher.")
    self_: Literal["ema"] | None = Field(None, alias="self", description="ema: the teacher is an exponential moving "
                                                                         "average of the student itself.")
    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per optimizer step (ema = decay*ema + "
                                                         "(1-decay)*student).")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.from_stage is None) == (self.self_ is None):
            raise ValueError("give exactly one of from_stage (an earlier stage's student) or self: ema")
        return self


class StageStudent(Strict):
    """A stage's own student: built by layer dropping from this stage's teacher (progressive compression)."""

    from_teacher: FromTeacher


class StudentSettings(ModelSettings):
    from_teacher: FromTeacher | None = None
    lora: LoraSettings | None = None

    @model_validator(mode="after")
    def _source(self):
        if self.name and self.from_teacher:
            raise ValueError("give either name (a checkpoint) or from_teacher (layer dropping), not both")
        return self


