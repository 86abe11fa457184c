"""`lmdistill wizard`: the guided path of seed 002. Asks fine-tuning or distillation, then models, data, settings and
an output folder; checks each answer on the spot; writes a config that `lmdistill run` re-runs; optionally runs it and
prints ROUGE-L of the student before and after training.

Every question has a key (shown in brackets after it). `--set KEY=VALUE` replaces that question's default answer and
`--yes` takes every default without asking, so a script can drive the same path a person does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.prompt import Prompt
from rich.syntax import Syntax
from rich.table import Table

from lmdistill.errors import ConfigError, LmdistillError

T = TypeVar("T")

APPROACHES = {"1": "finetune", "2": "distill"}
METHODS = {"1": "lora", "2": "qlora", "3": "adalora"}
# The seed's guide (002, "Key Parameters"): typical ranges, shown next to each question. Answers outside them are
# accepted with a note; only values the maths cannot take are refused.
GUIDE = {"temperature": (1.0, 5.0), "alpha": (0.0, 1.0), "learning_rate": (1e-5, 5e-4)}
QUESTION_KEYS = ("approach", "method", "model", "teacher", "student", "dataset", "samples", "eval_data", "eval_rows",
                 "temperature", "alpha", "epochs", "batch_size", "learning_rate", "advanced", "max_length",
                 "max_new_tokens", "speed", "output_dir", "config", "start")


# ------------------------------------------------------------------------------------------------ answer parsers
# Each takes the typed text and returns the value, or raises ValueError / LmdistillError saying why it is refused.
def choice(options: dict[str, str]) -> Callable[[str], str]:
    """A numbered choice: the number or the name itself ('2' or 'distill')."""
    def parse(raw: str) -> str:
        raw = raw.strip().lower()
        if raw in options:
            return options[raw]
        if raw in options.values():
            return raw
        listed = ", ".join(f"{k} ({v})" for k, v in options.items())
        raise ValueError(f"{raw!r} is not one of the choices: {listed}")
    return parse


def number(kind: type, low: float, high: float, low_open: bool = False) -> Callable[[str], Any]:
    """An int or float in [low, high] (or (low, high] with low_open)."""
    def parse(raw: str) -> Any:
        try:
            value = kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise ValueError(f"{value} is out of range: it must be in {bracket}{low:g}, {high:g}]")
        return value
    return parse


def yes_no(raw: str) -> bool:
    answer = raw.strip().lower()
    if answer in ("y", "yes", "true", "1"):
        return True
    if answer in ("n", "no", "false", "0"):
        return False
    raise ValueError(f"{raw!r}: answer y or n")


def model(raw: str) -> tuple[str, str]:
    """A model folder or hub name whose config loads (fast: no weights). Returns (name, task type)."""
    from lmdistill.models.load import detect_task_type

    name = raw.strip()
    if not name:
        raise ValueError("give a local model folder or a hub name such as gpt2")
    return name, detect_task_type(name)


def dataset(raw: str) -> tuple[str, str]:
    """A data file, folder or hub dataset whose first rows load in a known format. Returns (path, format)."""
    from lmdistill.data.formats import load_source

    path = raw.strip()
    if not path:
        raise ValueError("give a data file or folder, or a hub dataset name such as tatsu-lab/alpaca")
    return path, load_source(path, max_rows=8).format


def output_dir(raw: str) -> str:
    from lmdistill.config import CONFIG_FILE

    folder = Path(raw.strip()).expanduser()
    if folder.is_file():
        raise ValueError(f"{folder} is a file; give a folder for the run")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CONFIG_FILE).exists():
        raise ValueError(f"{folder} is not empty and holds no lmdistill run; give a new or empty folder")
    return str(folder)


def config_path(raw: str, replace: bool = False) -> Path:
    """replace: an existing file may be written over (`--restart`)."""
    path = Path(raw.strip()).expanduser()
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"{path}: end the name in .yaml (or .json)")
    if path.exists() and not replace:
        raise ValueError(f"{path} exists; give another name (or delete it first, or start over with --restart)")
    if not path.parent.is_dir():
        raise ValueError(f"folder {path.parent} does not exist")
    return path


# ------------------------------------------------------------------------------------------------ asking
@dataclass
class Asker:
    """Asks questions (or, with `yes`, takes their defaults), re-asking until an answer parses."""

    console: Console
    yes: bool = False
    defaults: dict[str, str] = field(default_factory=dict)
    restart: bool = False  # starting over (`--restart`): an earlier config file may be replaced

    def ask(self, key: str, question: str, default: Any, parse: Callable[[str], T], hint: str = "") -> T:
        default_text = self.defaults.get(key, "" if default is None else str(default))
        if hint:
            self.console.print(f"  [dim]{hint}[/]")
        while True:
            if self.yes:
                raw = default_text
            else:
                raw = Prompt.ask(f"{question} [dim]\\[{key}][/]", console=self.console,
                                 default=default_text, show_default=bool(default_text))
            try:
                return parse(raw)
            except (ValueError, LmdistillError) as err:
                if self.yes:
                    raise ConfigError(f"wizard answer {key}={raw!r}: {err}. Give another with --set {key}=VALUE "
                                      f"(or run without --yes to be asked)") from None
                self.console.print(f"[red]not accepted:[/] {escape(str(err))}. Please answer again.", highlight=False)

    def step(self, title: str) -> None:
        self.console.rule(f"[bold]{title}")


def _note_if_outside_guide(console: Console, key: str, value: float) -> None:
    low, high = GUIDE[key]
    if not low <= value <= high:
        console.print(f"  [yellow]note:[/] {key} {value:g} is outside the guide's typical {low:g}-{high:g}; kept")


# ------------------------------------------------------------------------------------------------ the questions
@dataclass
class Plan:
    """The answers, as a config dict plus what the wizard itself does with them."""

    config: dict
    config_file: Path
    train_rows: list[dict] | None = None  # rows to write when part of the training data is held out
    eval_rows: list[dict] | None = None


def _ask_models(asker: Asker, approach: str) -> dict[str, Any]:
    if approach == "finetune":
        method = asker.ask("method", "Method: 1 LoRA, 2 QLoRA (4-bit base), 3 AdaLoRA", "1", _method)
        name, task = asker.ask("model", "Model to fine-tune (folder or hub name)", "gpt2", model)
        return {"student": {"name": name, "lora": {"method": method}}, "task": task}
    teacher, task = asker.ask("teacher", "Teacher: the large model (folder or hub name)", "gpt2-medium", model)

    def student(raw: str) -> tuple[str, str]:
        name, student_task = model(raw)
        if student_task != task:
            raise ValueError(f"the teacher is {task} but {name} is {student_task}; pick a student of the same kind")
        return name, student_task
    student_name, _ = asker.ask("student", "Student: the smaller model to train", "gpt2", student)
    return {"teacher": {"name": teacher}, "student": {"name": student_name}, "task": task}


def _method(raw: str) -> str:
    method = choice(METHODS)(raw)
    if method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("QLoRA loads the model in 4-bit through bitsandbytes, which is not installed "
                             "(pip install 'lmdistill[gpu]'); choose LoRA or AdaLoRA, or install it") from None
    return method


def _ask_data(asker: Asker, console: Console) -> dict[str, Any]:
    from lmdistill.data.formats import load_source

    path, fmt = asker.ask("dataset", "Dataset (local file/folder or hub name)", "wikitext", dataset)
    console.print(f"  format: {fmt}")
    if fmt == "text":
        console.print("  [yellow]note:[/] plain text has no prompt/response pairs: ROUGE-L scores each model's "
                      "continuation of the first half of every held-out text against its second half")
    limit = asker.ask("samples", "Sample limit (rows to use; 0 = all)", 5000, number(int, 0, 10**9))
    rows = load_source(path, max_rows=limit or None).rows
    console.print(f"  {len(rows)} rows loaded")
    eval_path = asker.ask(
        "eval_data", "Evaluation data for ROUGE-L before/after (path or hub name; 'holdout' = part of the dataset)",
        "holdout", lambda raw: None if raw.strip().lower() == "holdout" else dataset(raw)[0])
    most = len(rows) - 1 if eval_path is None else 10**6
    if most < 1:
        raise ConfigError(f"{path}: only {len(rows)} row(s); holding rows out for evaluation needs at least 2. "
                          "Give a separate eval set or more rows")
    n_eval = asker.ask("eval_rows", "Evaluation rows (prompts answered and scored)", max(1, min(32, len(rows) // 10)),
                       number(int, 1, most))
    return {"path": path, "limit": limit, "rows": rows, "eval_path": eval_path, "n_eval": n_eval}


def ask_plan(asker: Asker) -> Plan:
    """Every question, in the seed's order; returns the plan (nothing written yet)."""
    console = asker.console
    asker.step("STEP 0: Select training approach")
    console.print("  1. Fine-Tuning    - adapt a model to a task (LoRA / QLoRA / AdaLoRA), same size\n"
                  "  2. Distillation   - compress a large teacher into a smaller student")
    approach = asker.ask("approach", "Approach", "1", choice(APPROACHES))
    asker.step("STEP 1: Models")
    models = _ask_models(asker, approach)
    asker.step("STEP 2: Dataset")
    data = _ask_data(asker, console)
    stage: dict[str, Any] = {"name": approach, "kind": approach}
    if approach == "distill":
        asker.step("STEP 3: Distillation settings  (loss = alpha*CE + (1-alpha)*T^2*KL(teacher || student))")
        stage["temperature"] = asker.ask(
            "temperature", "Temperature T", 2.0, number(float, 0, 20, low_open=True),
            hint="softens both distributions so the student learns the teacher's whole ranking; guide 1.0-5.0: "
                 "1-2 for similar sizes, 3-5 for very different sizes")
        _note_if_outside_guide(console, "temperature", stage["temperature"])
        stage["alpha"] = asker.ask(
            "alpha", "Alpha", 0.5, number(float, 0, 1),
            hint="weight of the hard-label CE loss (the rest goes to the teacher's soft targets); guide 0.0-1.0, "
                 "0.3-0.5 typical; 0.6-0.8 favours labels, 0.2-0.4 the teacher")
        stage["losses"] = [{"name": "forward_kl"}]
    else:
        stage["losses"] = [{"name": "cross_entropy"}]
    asker.step(f"STEP {4 if approach == 'distill' else 3}: Training settings")
    stage["epochs"] = asker.ask("epochs", "Epochs", 3, number(float, 0, 1000, low_open=True))
    batch = asker.ask("batch_size", "Batch size", 4, number(int, 1, 4096))
    lr = asker.ask("learning_rate", "Learning rate", "2e-4", number(float, 0, 0.1, low_open=True),
                   hint="guide 1e-5 to 5e-4")
    _note_if_outside_guide(console, "learning_rate", lr)
    advanced_keys = ("max_length", "max_new_tokens", "speed")
    advanced = asker.ask("advanced", "Change advanced settings (sequence length, generation, speed)? y/n",
                         "y" if set(advanced_keys) & set(asker.defaults) else "n", yes_no)
    max_length, max_new, speed = 512, 64, True
    if advanced:
        max_length = asker.ask("max_length", "Max tokens per example", max_length, number(int, 16, 1 << 20))
        max_new = asker.ask("max_new_tokens", "Tokens generated per answer for ROUGE-L", max_new, number(int, 1, 4096))
        speed = asker.ask("speed", "Time generation speed (tokens/s) in the report? y/n", "y", yes_no)
    asker.step(f"STEP {5 if approach == 'distill' else 4}: Output")
    out = asker.ask("output_dir", "Output directory", f"./{'distilled' if approach == 'distill' else 'finetuned'}_model",
                    output_dir)
    if approach == "finetune" and models["student"]["lora"]["method"] == "adalora":
        # AdaLoRA schedules its rank budget over a known number of steps: turn the epochs into steps here.
        n_train = len(data["rows"]) - (data["n_eval"] if data["eval_path"] is None else 0)
        stage["max_steps"] = max(1, math.ceil(stage.pop("epochs") * n_train / batch))
    config = {
        "task_type": models["task"],
        **({"teacher": models["teacher"]} if "teacher" in models else {}),
        "student": models["student"] | ({"quantization": {"bits": 4}}
                                        if models["student"].get("lora", {}).get("method") == "qlora" else {}),
        "data": {"max_length": max_length, "eval_max_rows": data["n_eval"]},
        "training": {"learning_rate": lr, "batch_size": batch},
        "generation": {"max_new_tokens": max_new},
        "evaluation": {"max_prompts": data["n_eval"], "measure_speed": speed},
        "output_dir": out,
        "stages": [stage],
    }
    plan = Plan(config, asker.ask("config", "Save the config as", f"{out.rstrip('/')}.yaml",
                                  lambda raw: config_path(raw, replace=asker.restart)))
    if data["eval_path"] is None:
        rows = [{k: v for k, v in row.items() if k != "row_id"} for row in data["rows"]]
        plan.train_rows, plan.eval_rows = rows[:-data["n_eval"]], rows[-data["n_eval"]:]
        held = Path(out).resolve() / "data"
        config["data"]["sources"] = {"train": {"path": str(held / "train.jsonl")}}
        config["data"]["eval"] = {"heldout": {"path": str(held / "eval.jsonl")}}
    else:
        config["data"]["sources"] = {"train": {"path": data["path"], **({"max_rows": data["limit"]}
                                                                          if data["limit"] else {})}}
        config["data"]["eval"] = {"eval": {"path": data["eval_path"]}}
    return plan


# ------------------------------------------------------------------------------------------------ write, run, report
def write_plan(plan: Plan, restart: bool = False) -> None:
    """The held-out data files (when any) and the config, with a header saying how to re-run it. Split files an
    earlier run of the output directory trained on are replaced only when starting over (restart): their paths
    stay the same, so nothing else would tell that run its data changed."""
    from lmdistill.config import config_from_dict

    config_from_dict(plan.config, source="wizard answers")  # the answers must make a valid config before any write
    if plan.train_rows is not None:
        data = plan.config["data"]
        files = [(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                 for rows, path in ((plan.train_rows, data["sources"]["train"]["path"]),
                                    (plan.eval_rows, data["eval"]["heldout"]["path"]))]
        for target, text in files:
            if not restart and target.exists() and target.read_text(encoding="utf-8") != text:
                raise ConfigError(f"{target} holds another split of the data (an earlier run in this output "
                                  "directory trained on it; the dataset, samples or eval_rows answers differ): run "
                                  "`lmdistill wizard --restart` to start it over with these answers, or give "
                                  "another output directory")
        for target, text in files:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    header = (f"# written by `lmdistill wizard`; re-run with: lmdistill run {plan.config_file}\n"
              f"# every key is explained in `lmdistill init --preset {'simple' if 'teacher' in plan.config else 'finetune'}`\n")
    body = (json.dumps(plan.config, indent=2) if plan.config_file.suffix == ".json"
            else yaml.safe_dump(plan.config, sort_keys=False))
    plan.config_file.write_text(body if plan.config_file.suffix == ".json" else header + body, encoding="utf-8")


def rouge_table(run_dir: Path) -> Table | None:
    """ROUGE-L (answers to eval prompts, or continuations of held-out text prefixes) and exact match when scored,
    of each evaluated role, from RUN_DIR/metrics.json."""
    from lmdistill.eval.evaluate import read_metrics

    metrics = read_metrics(run_dir)
    keys = [k for k in ("rouge_l", "rouge_l_continuation", "exact_match") if any(k in row for row in metrics.values())]
    roles = [r for r in ("teacher", "student_before", "student_after") if set(keys) & set(metrics.get(r, {}))]
    if not roles:
        return None
    table = Table(title="benchmark: ROUGE-L on the generated answers and continuations")
    table.add_column("model")
    for key in keys:
        table.add_column(key, justify="right")
    for role in roles:
        table.add_row(role, *(f"{metrics[role][k]:.4f}" if k in metrics[role] else "-" for k in keys))
    return table


def run_wizard(console: Console, *, yes: bool = False, defaults: dict[str, str] | None = None,
               restart: bool = False) -> Path | None:
    """The whole guided path. Returns the run directory when training ran, else None. restart: start over, replacing
    an earlier config file and clearing what an earlier run wrote to the output directory (as `lmdistill run CONFIG
    --restart`)."""
    unknown = sorted(set(defaults or {}) - set(QUESTION_KEYS))
    if unknown:
        raise ConfigError(f"--set {unknown[0]}=...: no such wizard question; the keys are {', '.join(QUESTION_KEYS)}")
    asker = Asker(console, yes=yes, defaults=dict(defaults or {}), restart=restart)
    plan = ask_plan(asker)
    write_plan(plan, restart)
    console.print(Panel(Syntax(plan.config_file.read_text(encoding="utf-8"), "yaml", word_wrap=True),
                        title=f"config: {plan.config_file}"))
    console.print(f"wrote {plan.config_file}; re-run any time with: lmdistill run {plan.config_file}")
    if not asker.ask("start", "Start training now? y/n", "y", yes_no):
        return None
    from lmdistill.config import CONFIG_FILE, load_config
    from lmdistill.train.pipeline import run_pipeline
    from lmdistill.train.rerun import check_same_config

    config = load_config(plan.config_file)
    if not restart:
        check_same_config(Path(config.output_dir), config, CONFIG_FILE,
                          way_out="run `lmdistill wizard --restart` to start it over with these answers, or give "
                                  "another output directory")
    run_dir = run_pipeline(config, restart=restart)
    table = rouge_table(run_dir)
    if table is not None:
        console.print(table)
    console.print(f"done: {run_dir} (report: {run_dir / 'report.html'}, model: {run_dir / 'final'})")
    return run_dir
