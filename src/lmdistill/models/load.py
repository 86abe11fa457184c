"""Load teacher, student and tokenizer by hub name or local folder, with dtype, device, quantisation and LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel

from lmdistill.config import LoraSettings, ModelSettings, StudentSettings
from lmdistill.errors import ModelError
from lmdistill.model_config import LoadedTeacher
from lmdistill.models.sharding import local_parameter_count, teacher_shard_size

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(setting: str = "auto", no_cuda: bool = False) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and not no_cuda else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {setting!r} asked for, but CUDA is not available on this machine; use device: cpu")
    return device


def _hub_or_folder_error(name: str, err: Exception) -> ModelError:
    if Path(name).expanduser().exists():
        return ModelError(f"cannot load {name!r}: {str(err).splitlines()[0]}")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        return ModelError(f"model path {name!r} does not exist")
    return ModelError(
        f"cannot load {name!r}: not a local folder, and the hub could not provide it ({str(err).splitlines()[0]}). "
        "Check the name, your network, or HF_HUB_OFFLINE.")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a model; a missing pad token is set to eos (with a warning), as padding needs one."""
    from lmdistill.data.tokenize import prepare_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_or_folder_error(name, err) from None
    return prepare_tokenizer(tokenizer)


def detect_task_type(name: str, trust_remote_code: bool = False) -> str:
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_or_folder_error(name, err) from None
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _quantization_config(settings: ModelSettings):
    q = settings.quantization
    if q is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            f"quantization.bits={q.bits} needs bitsandbytes: pip install 'lmdistill[gpu]' (it is the `gpu` extra)"
        ) from None
    from transformers import BitsAndBytesConfig

    if q.bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=_DTYPES[q.compute_dtype])
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(settings: ModelSettings, task_type: str, *, device: torch.device, name: str | None = None,
               shard_over: int = 1) -> PreTrainedModel:
    """Load a model as configured; `name` overrides settings.name (used for checkpoints of earlier stages).

    shard_over > 1: loaded with FSDP2 over that many launched processes (lmdistill.models.sharding), each process
    reading its own shard onto its own device (`cuda:LOCAL_RANK`, or the CPU); `device` is then not used."""
    name = name or settings.name
    if not name:
        raise ModelError("no model name or path given")
    if shard_over > 1 and settings.quantization is not None:
        raise ModelError(f"{name!r}: a quantized teacher cannot be sharded over processes; set teacher.shard: never "
                         "(or shard: never on its entry of teachers:): each process then holds a whole quantized copy")
    auto = AutoModelForSeq2SeqLM if task_type == "seq2seq" else AutoModelForCausalLM
    kwargs = {"trust_remote_code": settings.trust_remote_code}
    if settings.dtype != "auto":
        kwargs["dtype"] = _DTYPES[settings.dtype]
    else:
        kwargs["dtype"] = "auto"
    if settings.attn_implementation:
        kwargs["attn_implementation"] = settings.attn_implementation
    quant = _quantization_config(settings)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    if shard_over > 1:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(fsdp_size=shard_over)
    try:
        model = auto.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise _hub_or_folder_error(name, err) from None
    if quant is None and shard_over == 1:
        model.to(device)
    return model


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """A teacher: eval mode (no dropout), no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_teacher(settings: LoadedTeacher, task_type: str, *, device: torch.device,
                   processes: int) -> PreTrainedModel:
    """A frozen teacher, each one (the run's and every other of `teachers:`) split over the `processes` launched
    when its own `shard` setting says so (lmdistill.models.sharding); processes=1: a whole copy."""
    shard_over = teacher_shard_size(settings.shard, processes)
    teacher = freeze(load_model(settings, task_type, device=device, shard_over=shard_over))
    if shard_over > 1:
        held, total = local_parameter_count(teacher)
        log.info("teacher %s sharded over %d processes: this one holds %d of its %d parameters", settings.name,
                 shard_over, held, total)
    return teacher


def apply_lora(model: PreTrainedModel, lora: LoraSettings, task_type: str, total_steps: int | None = None,
               seed: int = 0):
    """Wrap a student with peft adapters (LoRA, QLoRA = LoRA on a k-bit base, AdaLoRA). New adapters start from
    `seed`, not from whatever the global generator holds (it differs from one process to the next), so every
    run, every process, and a run resumed after a kill start them alike."""
    from peft import AdaLoraConfig, LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training

    if lora.method == "qlora":
        if not getattr(model, "is_quantized", False):
            # Without a k-bit base, QLoRA would silently be plain LoRA on full-precision weights.
            raise ModelError("student.lora.method=qlora trains adapters on a 4-bit base, but the student was loaded "
                             "unquantized: add student.quantization: {bits: 4} (or use method: lora)")
        _keep_4bit_layout(model)
    if isinstance(model, PeftModel):
        # Adapters loaded from an earlier stage: keep training them (peft loads them frozen by default).
        for pname, param in model.named_parameters():
            if "lora_" in pname:
                param.requires_grad_(True)
        return model
    peft_task = TaskType.SEQ_2_SEQ_LM if task_type == "seq2seq" else TaskType.CAUSAL_LM
    common = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                  task_type=peft_task)
    if lora.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if lora.method == "adalora":
        if not total_steps:
            raise ModelError("student.lora.method=adalora schedules its rank budget over a known number of steps: "
                             "set max_steps on every stage (epochs alone do not give it)")
        peft_config = AdaLoraConfig(init_r=lora.r * 2, target_r=lora.r, total_step=total_steps, **{
            k: v for k, v in common.items() if k != "r"})
    else:
        peft_config = LoraConfig(**common)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config)


def _keep_4bit_layout(model: PreTrainedModel) -> None:
    """Stop bitsandbytes (0.50) from repacking a trainable 4-bit base for its AVX512-BF16 CPU inference kernel.

    It repacks each Linear4bit in place at its first eval-mode forward (a Trainer evaluation, say) and keeps the
    new layout for good; training steps after that run through the packed kernel, whose backward gives wrong input
    gradients (checked here: LoRA gradients off by up to 100%), and dequantize_4bit misreads the packed weights.
    Related upstream: bitsandbytes-foundation/bitsandbytes#2078 (the packed layout corrupting weights on .to())."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_student(settings: StudentSettings, task_type: str, *, device: torch.device, teacher: PreTrainedModel | None,
                 checkpoint: str | None = None) -> PreTrainedModel:
    """The student: from a checkpoint (a previous stage's best, or --checkpoint_path), its configured name, or built
    from the teacher by layer dropping. LoRA is applied by the trainer set-up, not here."""
    from lmdistill.models.sharding import is_sharded
    from lmdistill.models.student_init import student_from_teacher

    if checkpoint:
        return _load_checkpoint(settings, task_type, device, checkpoint)
    if settings.from_teacher is not None:
        if teacher is None:
            raise ModelError("student.from_teacher needs a teacher model; set teacher.name")
        if is_sharded(teacher):
            raise ModelError("student.from_teacher copies the teacher's layers, but the teacher is sharded over the "
                             "processes: set teacher.shard: never, or build the student in one process first "
                             "(a one-stage run with max_steps: 0) and give its folder as student.name")
        return student_from_teacher(teacher, settings.from_teacher).to(device)
    return load_model(settings, task_type, device=device)


def _load_checkpoint(settings: StudentSettings, task_type: str, device: torch.device, path: str) -> PreTrainedModel:
    """A checkpoint folder: full weights, or a peft adapter folder (adapter_config.json) on top of its base."""
    folder = Path(path)
    if not folder.exists():
        raise ModelError(f"checkpoint path {path!r} does not exist")
    if (folder / "adapter_config.json").exists():
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(path).base_model_name_or_path
        base = load_model(settings, task_type, device=device, name=base_name)
        return PeftModel.from_pretrained(base, path, is_trainable=True)
    return load_model(settings, task_type, device=device, name=path)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
