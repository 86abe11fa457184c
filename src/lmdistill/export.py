"""Export the distilled student to RUN_DIR/final (weights, tokenizer, generation config, resolved config, model
card) and upload that folder to the Hugging Face Hub."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

from lmdistill.config import CONFIG_FILE
from lmdistill.errors import LmdistillError, ModelError
from lmdistill.eval.evaluate import KNOWN_ROLES

FINAL_DIR = "final"


class CardInfo(TypedDict, total=False):
    """What the model card says. Every key is optional; sections without data are left out."""

    name: str  # title of the card
    teacher: str  # teacher model name or path
    student: str  # the student's starting point (model name, path, or "layers dropped from the teacher")
    data: Sequence[str]  # datasets used, one line each
    stages: Sequence[Mapping[str, Any]]  # one dict per stage, e.g. {"name": ..., "losses": ..., "steps": ...}
    metrics: Mapping[str, Mapping[str, float]]  # role -> metrics, as in metrics.json
    license: str


def format_value(value: Any) -> str:
    """Numbers to 4 significant digits (integers as integers), anything else as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[format_value(v).replace("|", "\\|") for v in row] for row in rows]
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(r)} |" for r in cells)]


def model_card(info: CardInfo, encoder_decoder: bool = False, adapter_only: bool = False) -> str:
    """README.md for the exported folder: Hub front matter, provenance (teacher, student, data, stages), the
    metrics table (metrics as rows, roles as columns) and a usage snippet."""
    auto_class = "AutoModelForSeq2SeqLM" if encoder_decoder else "AutoModelForCausalLM"
    front = ["---", "library_name: " + ("peft" if adapter_only else "transformers"),
             "pipeline_tag: " + ("text2text-generation" if encoder_decoder else "text-generation"),
             "tags:", "- lmdistill", "- distillation"]
    if info.get("license"):
        front.append(f"license: {info['license']}")
    lines = [*front, "---", "", f"# {info.get('name', 'Distilled student')}", "",
             "Distilled with lmdistill from a larger teacher model."
             + (" This folder holds LoRA adapters; load them on top of the student's base model." if adapter_only
                else ""), ""]
    for key, title in (("teacher", "Teacher"), ("student", "Student initialised from")):
        if info.get(key):
            lines.append(f"- **{title}:** `{info[key]}`")
    if info.get("data"):
        lines += ["- **Data:**", *(f"  - {d}" for d in info["data"])]
    stages = list(info.get("stages") or [])
    if stages:
        keys = list(dict.fromkeys(k for stage in stages for k in stage))
        lines += ["", "## Stages", "", *_markdown_table(keys, [[s.get(k, "") for k in keys] for s in stages])]
    metrics = info.get("metrics") or {}
    if metrics:
        roles = [r for r in KNOWN_ROLES if r in metrics] + [r for r in metrics if r not in KNOWN_ROLES]
        names = list(dict.fromkeys(k for r in roles for k in metrics[r]))
        rows = [[name, *(metrics[r].get(name, "") for r in roles)] for name in names]
        lines += ["", "## Metrics", "", *_markdown_table(["metric", *roles], rows)]
    lines += ["", "## Usage", "", "```python", f"from transformers import {auto_class}, AutoTokenizer", "",
              'path = "PATH_OR_REPO_ID"', "tokenizer = AutoTokenizer.from_pretrained(path)",
              f"model = {auto_class}.from_pretrained(path)",
              'inputs = tokenizer("Your prompt", return_tensors="pt")',
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))",
              "```", ""]
    return "\n".join(lines)


def _generation_config(model: torch.nn.Module, tokenizer) -> GenerationConfig:
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig.from_model_config(model.config)
    # Tiny or freshly built students often lack these, and generate() then warns or cannot stop.
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


def _is_peft(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _merged(model) -> torch.nn.Module:
    """The adapters of a peft `model` merged into plain weights, on a copy: the caller may still evaluate or keep
    training the adapter model after export.

    A QLoRA student (adapters on a 4-bit or 8-bit bitsandbytes base) is merged into its base dequantized to the
    student's dtype: exactly the function it was trained and evaluated as, in a folder that loads without
    bitsandbytes. Merging into the quantized weights instead re-rounds every merged weight (peft warns so) and
    keeps the quantization config. The base is quantized afresh from its own weights (the same codes) rather than
    dequantized from `model`: bitsandbytes 0.50 repacks 4-bit weights in place for its AVX512-BF16 CPU kernel at
    the first eval-mode forward, and dequantize_4bit misreads the packed layout."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base = model.get_base_model()
    if not getattr(base, "is_quantized", False):
        return copy.deepcopy(model).merge_and_unload()
    adapter = model.active_adapter
    peft_config = copy.deepcopy(model.peft_config[adapter])
    name = peft_config.base_model_name_or_path
    auto = AutoModelForSeq2SeqLM if base.config.is_encoder_decoder else AutoModelForCausalLM
    try:
        # base.dtype: that of its unquantized parts (embeddings, norms), i.e. the student's configured dtype
        fresh = auto.from_pretrained(name, dtype=base.dtype, quantization_config=base.hf_quantizer.quantization_config,
                                     device_map={"": str(base.device)})
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot merge the QLoRA adapters: their base model {name!r} does not load "
                         f"({str(err).splitlines()[0]}); set student.lora.merge_on_save: false to export the adapters "
                         f"alone") from None
    full = get_peft_model(fresh.dequantize(dtype=base.dtype), peft_config, adapter_name=adapter)
    set_peft_model_state_dict(full, get_peft_model_state_dict(model, adapter_name=adapter), adapter_name=adapter)
    return full.merge_and_unload()


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` folder to `out_dir`, replacing an older export only once the new one is whole."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_student(model: torch.nn.Module, tokenizer, out_dir: str | Path, config_yaml: str,
                   card_info: CardInfo | None = None, merge_lora: bool = True) -> Path:
    """Write the student as a self-contained model folder, atomically (temp folder + rename).

    The folder holds safetensors weights (LoRA adapters merged into the base weights of a copy of `model`
    unless `merge_lora` is False, in which case only the adapters are saved), the tokenizer, generation_config.json,
    lmdistill_config.yaml (`config_yaml`, the resolved config) and README.md (`model_card(card_info)`).
    Returns the folder path. `model` itself is left unchanged.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    peft_model = _is_peft(model)
    adapter_only = peft_model and not merge_lora
    if peft_model and merge_lora:
        model = _merged(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; an exported model is meant to be shared
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        base = model.get_base_model() if adapter_only else model
        _generation_config(base, tokenizer).save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
        encoder_decoder = bool(getattr(base.config, "is_encoder_decoder", False))
        (tmp / "README.md").write_text(model_card(card_info or {}, encoder_decoder, adapter_only), encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return env or constants.HF_HUB_OFFLINE


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of the HTTP client huggingface_hub uses: httpx in its 1.x releases,
    httpx2 in 2.x; both are looked up so that either version reports "no connection" the same way."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except ImportError:
            continue
    return tuple(errors)


def push_to_hub(run_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                endpoint: str | None = None) -> str:
    """Upload RUN_DIR/final (never the checkpoints) to the Hub model repo `repo_id`, creating it if needed.

    `endpoint` overrides the Hub address (default: HF_ENDPOINT or huggingface.co). Returns the commit URL.
    Offline mode, no connection, or a refused token raise an LmdistillError with a one-line message.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    final = Path(run_dir) / FINAL_DIR
    if not (final / "config.json").exists() and not (final / "adapter_config.json").exists():
        raise ModelError(f"no exported model in {final}: finish `lmdistill run` (it exports the student there) "
                         f"before pushing")
    where = f"cannot push {final} to the Hub repo {repo_id}"
    if _offline():
        raise LmdistillError(f"{where}: offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE on a "
                             f"connected machine and run push again")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=final, repo_type="model",
                                   commit_message="Upload distilled student (lmdistill)")
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = ("log in with `hf auth login` or pass --token" if status in (401, 403)
                else "check the repo id and your rights on it")
        raise LmdistillError(f"{where}: the Hub answered HTTP {status}; {hint}") from err
    except (OfflineModeIsEnabled, *_transport_errors()) as err:
        raise LmdistillError(f"{where}: no connection to the Hub ({type(err).__name__}); check the network "
                             f"and run push again") from err
    return str(commit.commit_url)
