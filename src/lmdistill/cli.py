"""The `lmdistill` command line: parse -> config -> pipeline. No training logic lives here.

User mistakes (LmdistillError) print one line and exit 1; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from lmdistill.cli_help import PlainFlagsCommand, PlainFlagsGroup
from lmdistill.config import TrainingSettings
from lmdistill.errors import ConfigError, LmdistillError


app = typer.Typer(cls=PlainFlagsGroup, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Distill a large language model (teacher) into a smaller one (student).")
console = Console(stderr=True)


def command(name: str | None = None, **settings):
    """app.command, its flags shown as flags in --help."""
    return app.command(name, cls=PlainFlagsCommand, **settings)


PRESETS = {"multistage": "multistage.yaml", "strong-to-weak": "strong_to_weak.yaml", "simple": "simple.yaml",
           "finetune": "finetune.yaml", "progressive": "progressive.yaml"}


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on every CPU import that optional GPU kernels are absent: not the user's concern.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def preset_text(name: str) -> str:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return resources.files("lmdistill.presets").joinpath(PRESETS[name]).read_text(encoding="utf-8")


def _opt(*names: str, help: str, **kw):
    """An option spelled both ways (--teacher-model and --teacher_model), as the seeds' users type them."""
    spellings = []
    for name in names:
        spellings += [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
    return typer.Option(None, *spellings, help=help, show_default=False, **kw)


# ------------------------------------------------------------------------------------------------ init
@command()
def init(preset: str = typer.Option("simple", "--preset", "-p", help=f"One of: {', '.join(PRESETS)}."),
         output: Path = typer.Option(Path("lmdistill.yaml"), "--output", "-o", help="Where to write the config.")):
    """Write a commented config for a preset (as main_distillation.py --create_config does)."""
    _write_new(output, preset_text(preset))
    console.print(f"wrote {output} (preset {preset}); edit it, then: lmdistill run {output}")


def _write_new(path: Path, text: str) -> None:
    """Write a config file, never over an existing one (it may hold the user's edits)."""
    if path.exists():
        raise ConfigError(f"{path} exists; choose another file name or remove it")
    path.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ run
@command(context_settings={"help_option_names": ["-h", "--help"]})
def run(
    config: Optional[Path] = typer.Argument(None, help="Pipeline config (YAML or JSON). Without one the flags "
                                                       "describe the run, as in run_distillation.py and llm_kd.py: "
                                                       "--general_dataset and --domain_dataset run the three stages "
                                                       "of the `multistage` preset, --dataset one KD stage (`simple`)."),
    config_opt: Optional[Path] = _opt("config", help="Same as the CONFIG argument (main_distillation.py's spelling)."),
    stage: str = typer.Option("all", "--stage", help="all | non_policy | policy | test (test: load models and data, "
                                                     "print a summary, train nothing)."),
    create_config: Optional[Path] = _opt("create_config", help="Write the `strong-to-weak` preset here and exit."),
    teacher_model: Optional[str] = _opt("teacher_model", help="Teacher: hub name or local folder."),
    teacher_endpoint: Optional[str] = _opt("teacher_endpoint", help="Base URL of a vLLM (OpenAI-compatible) server "
                                           "serving the teacher: stages get its generations, samples and top-k "
                                           "log-probs from it; the teacher is not loaded here (teacher.endpoint)."),
    student_model: Optional[str] = _opt("student_model", help="Student: hub name or local folder."),
    pretrained_student: Optional[str] = _opt("pretrained_student", help="Start from this student checkpoint."),
    output_dir: Optional[str] = _opt("output_dir", help="Run directory."),
    general_dataset: Optional[str] = _opt("general_dataset", help="Source `general`."),
    domain_dataset: Optional[str] = _opt("domain_dataset", "finance_dataset", "medical_dataset",
                                         help="Source `domain` (aliases --finance_dataset, --medical_dataset)."),
    general_csv_path: Optional[str] = _opt("general_csv_path", help="Source `general` from a CSV file."),
    medical_csv_path: Optional[str] = _opt("medical_csv_path", help="Source `domain` from a CSV file."),
    eval_csv_path: Optional[str] = _opt("eval_csv_path", help="Eval set `eval` from a CSV file."),
    dataset: Optional[str] = _opt("dataset", help="The single training source, as in llm_kd.py; without a config "
                                                  "file: one KD stage on it."),
    num_samples: Optional[int] = _opt("num_samples", help="Cap rows per source."),
    task_type: Optional[str] = _opt("task_type", help="causal | seq2seq."),
    max_length: Optional[int] = _opt("max_length", help="Max tokens per example."),
    batch_size: Optional[int] = _opt("batch_size", help="Per-device batch size (every stage)."),
    gradient_accumulation_steps: Optional[int] = _opt("gradient_accumulation_steps", help="Micro-batches per update."),
    optimizer: Optional[str] = _opt("optimizer", help="adamw | sgd | adafactor."),
    learning_rate: Optional[float] = _opt("learning_rate", help="Peak learning rate (every stage)."),
    weight_decay: Optional[float] = _opt("weight_decay", help="Weight decay."),
    temperature: Optional[float] = _opt("temperature", help="KD temperature (every stage)."),
    epochs: Optional[float] = _opt("epochs", help="Epochs (every stage)."),
    warmup_ratio: Optional[float] = _opt("warmup_ratio", help="Warmup share of the steps."),
    lr_scheduler_type: Optional[str] = _opt("lr_scheduler_type", help="linear | cosine | constant | ..."),
    clip_grad_norm: Optional[float] = _opt("clip_grad_norm", help="Max gradient norm (0: off)."),
    vocab_chunk_size: Optional[int] = _opt("vocab_chunk_size", help="Tokens per loss chunk (bounds loss memory)."),
    save_every: Optional[int] = _opt("save_every", help="Checkpoint every N steps."),
    log_interval: Optional[int] = _opt("log_interval", help="Log every N steps."),
    seed: Optional[int] = _opt("seed", help="Seed for everything."),
    fp16: bool = typer.Option(False, "--fp16", help="Train in fp16 mixed precision (CUDA only)."),
    bf16: bool = typer.Option(False, "--bf16", help="Train in bf16 mixed precision."),
    no_cuda: bool = typer.Option(False, "--no-cuda", "--no_cuda", help="Train on CPU even with a GPU."),
    use_lora: bool = typer.Option(False, "--use-lora", "--use_lora", help="Train LoRA adapters on the student."),
    use_wandb: bool = typer.Option(False, "--use-wandb", "--use_wandb", help="Also log to Weights & Biases."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad data row (default: skip it)."),
    start_stage: Optional[int] = _opt("start_stage", help="First stage to run (1-based)."),
    end_stage: Optional[int] = _opt("end_stage", help="Last stage to run (1-based)."),
    checkpoint_path: Optional[str] = _opt("checkpoint_path", help="Student checkpoint the first run stage starts from."),
    restart: bool = typer.Option(False, "--restart", help="Start over in the output directory: delete what an earlier "
                                                          "run wrote there (stages, metrics, report; teacher outputs "
                                                          "are kept). Needed when the settings changed."),
):
    """Run a distillation pipeline (all stages, a slice, or `--stage test`). Re-running with the same settings
    resumes; with other settings it stops and names them (--restart or a new --output_dir)."""
    from lmdistill.config import config_from_dict, read_config_file
    from lmdistill.overrides import apply_overrides, flags_only_config, preset_for_flags

    if create_config is not None:
        _write_new(create_config, preset_text("strong-to-weak"))
        console.print(f"wrote {create_config} (preset strong-to-weak); edit it, then: lmdistill run {create_config}")
        return
    if stage not in ("all", "non_policy", "policy", "test"):
        raise ConfigError(f"--stage must be all, non_policy, policy or test, not {stage!r}")
    path = config or config_opt
    flags = {k: v for k, v in locals().items() if k in _FLAG_NAMES}
    raw = read_config_file(path) if path else flags_only_config(_preset_dict(preset_for_flags(flags)), flags)
    resolved = config_from_dict(apply_overrides(raw, flags), source=str(path or "flags"))
    if stage == "test":
        from lmdistill.train.summary import print_summary

        print_summary(resolved, console)
        return
    from lmdistill.train.pipeline import run_pipeline

    run_dir = run_pipeline(resolved, start_stage=start_stage, end_stage=end_stage,
                           checkpoint_path=checkpoint_path or pretrained_student, kinds=stage, restart=restart)
    console.print(f"done: {run_dir}")


_FLAG_NAMES = {
    "teacher_model", "teacher_endpoint", "student_model", "output_dir", "general_dataset", "domain_dataset",
    "general_csv_path", "medical_csv_path", "eval_csv_path", "dataset", "num_samples", "task_type", "max_length", "batch_size",
    "gradient_accumulation_steps", "optimizer", "learning_rate", "weight_decay", "temperature", "epochs",
    "warmup_ratio", "lr_scheduler_type", "clip_grad_norm", "vocab_chunk_size", "save_every", "log_interval", "seed",
    "fp16", "bf16", "no_cuda", "use_lora", "use_wandb", "strict",
}


def _preset_dict(name: str) -> dict:
    import yaml

    from lmdistill.config import _Yaml12Loader

    return yaml.load(preset_text(name), Loader=_Yaml12Loader)


# ------------------------------------------------------------------------------------------------ data
@command()
def data(path: str = typer.Argument(..., help="File, folder, datasets folder or hub dataset name."),
         tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder or hub name."),
         max_length: int = typer.Option(512, "--max-length", "--max_length", help="Max tokens per example."),
         strict: bool = typer.Option(False, "--strict", help="Stop at the first bad row (default: skip it)."),
         columns: Optional[str] = typer.Option(None, "--columns", help="Map roles to your column names, e.g. "
                                               "prompt=context,response=target (as data.sources.NAME.columns)."),
         train_on: str = typer.Option("all_assistant", "--train-on", help="all_assistant (every assistant turn of "
                                      "a chat) or last_assistant (the last only), as data.train_on."),
         as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object.")):
    """Detect a dataset's format, load and tokenize it, and summarise what training would see."""
    from lmdistill.data.columns import parse_mapping
    from lmdistill.data.summary import summarize_data
    from lmdistill.models.load import load_tokenizer

    if tokenizer is None:
        raise ConfigError("--tokenizer is required (a tokenizer folder or hub name) to count and mask tokens")
    summary = summarize_data(path, load_tokenizer(tokenizer), max_length=max_length, strict=strict,
                             columns=parse_mapping(columns or ""), train_on=train_on)
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    console.print(f"[bold]{path}[/]: format {summary['format']}, rows {summary['rows']}, kept {summary['kept']}, "
                  f"skipped {summary['skipped'] or 0}; layouts {summary['layouts']}")
    if summary["ignored_columns"]:
        console.print(f"ignored columns: {', '.join(summary['ignored_columns'])} (map them with --columns "
                      f"ROLE=COLUMN to use them)", markup=False)
    console.print("example (trained-on tokens in [[ ]]):")
    console.print(summary["example"], markup=False, highlight=False)


# ------------------------------------------------------------------------------------------------ teacher outputs
_ENDPOINT_HELP = ("Base URL of a vLLM (OpenAI-compatible) server serving the teacher, e.g. http://127.0.0.1:8000/v1: "
                  "asked instead of loading the teacher here (teacher.endpoint).")


@command("cache-teacher")
def cache_teacher(config: Path = typer.Argument(..., help="Pipeline config (YAML or JSON)."),
                  k: Optional[int] = typer.Option(None, "--k", min=1, help="Log-probs kept per token "
                                                                            "(default: teacher_cache.k, 64)."),
                  temperature: Optional[float] = typer.Option(None, "--temperature", min=1e-6,
                                                              help="Capture temperature (default: teacher_cache."
                                                                   "temperature, 1.0)."),
                  out: Optional[Path] = typer.Option(None, "--out", help="Cache folder (default: teacher_cache.path "
                                                                         "or OUTPUT_DIR/teacher_cache)."),
                  teacher_endpoint: Optional[str] = _opt("teacher_endpoint", help=_ENDPOINT_HELP)):
    """Run the teacher once over the data and store its top-k log-probs (stages with teacher_source: cache).
    A teacher with another tokenizer than the student's reads its own tokens, and its top-k over its own
    vocabulary is kept at the positions aligned with the student's (for uld / cross_vocab_kl).
    Re-running continues after the last complete shard."""
    from lmdistill.config import load_config
    from lmdistill.train.teacher_commands import cache_teacher as run_cache, with_endpoint

    folder, manifest = run_cache(with_endpoint(load_config(config), teacher_endpoint), out=out, k=k,
                                 temperature=temperature)
    console.print(f"teacher cache: {folder} ({len(manifest.shards)} shards, k={manifest.k}, "
                  f"{manifest.bytes_per_token():.1f} bytes per token)")


@command()
def generate(config: Path = typer.Argument(..., help="Pipeline config (YAML or JSON)."),
             num_samples: Optional[int] = typer.Option(None, "--num-samples", "--num_samples", min=1,
                                                       help="Generations per prompt (default: generation.num_samples)."),
             max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "--max_new_tokens", min=1,
                                                          help="(default: generation.max_new_tokens)."),
             out: Optional[Path] = typer.Option(None, "--out", help="JSONL file (default: generation.path or "
                                                                    "OUTPUT_DIR/generations.jsonl)."),
             teacher_endpoint: Optional[str] = _opt("teacher_endpoint", help=_ENDPOINT_HELP)):
    """Teacher generations for every prompt of the training sources (teacher_source: generations). Plain-text
    sources are continued from the first part of each text (generation.text_prompt_fraction); a file of prompts
    alone works too. Each line holds the full text, split at the exact boundary, and whether the teacher stopped.
    Re-running skips rows already written."""
    from lmdistill.config import load_config
    from lmdistill.train.teacher_commands import generate as run_generate, with_endpoint

    path, written = run_generate(with_endpoint(load_config(config), teacher_endpoint), num_samples=num_samples,
                                 max_new_tokens=max_new_tokens, out=out)
    console.print(f"generations: {path} ({written} new lines)")


# ------------------------------------------------------------------------------------------------ eval / report / push
@command("eval")
def eval_command(target: str = typer.Argument(..., help="A run directory (its final/ student and teacher, loaded as "
                                                        "the run loaded them, on its eval sets) or a model folder / "
                                                        "hub name (with --data)."),
                 teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher for agreement and KL "
                                                                               "(default: the run's)."),
                 data_paths: list[str] = typer.Option([], "--data", help="Eval data file (repeatable; default: the "
                                                                         "run's eval sets)."),
                 max_rows: Optional[int] = typer.Option(None, "--max-rows", "--max_rows", min=1,
                                                        help="Rows scored per eval set (default: the run's "
                                                             "data.eval_max_rows; with --data, every row)."),
                 max_length: Optional[int] = typer.Option(None, "--max-length", "--max_length", min=9,
                                                          help="Max tokens per example (default: the run's, or 512)."),
                 max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "--max_new_tokens", min=1,
                                                              help="Generated tokens per prompt (default: the run's "
                                                                   "generation.max_new_tokens, or 64)."),
                 merge: bool = typer.Option(False, "--merge", help="Merge into the run's metrics.json (what its "
                                                                   "report shows) instead of eval_metrics.json."),
                 out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics to this JSON file.")):
    """Perplexity, teacher agreement and KL, ROUGE-L / exact match, size and speed."""
    from rich.table import Table

    from lmdistill.train.eval_command import evaluate_target

    result = evaluate_target(target, teacher, data_paths, max_length=max_length, max_new_tokens=max_new_tokens,
                             max_rows=max_rows, merge=merge, out=out)
    metrics = result.metrics
    keys = sorted({k for row in metrics.values() for k in row})
    table = Table(title=f"lmdistill eval {target}")
    table.add_column("metric")
    for role in metrics:
        table.add_column(role, justify="right")
    for key in keys:
        table.add_row(key, *[f"{metrics[r][key]:.4g}" if key in metrics[r] else "-" for r in metrics])
    Console().print(table)
    for name, rows in result.rows.items():
        capped = f" (capped at {result.row_cap} rows per eval set: --max-rows)" if rows == result.row_cap else ""
        console.print(f"eval set {name}: {rows} rows scored{capped}")
    if result.written:
        console.print(f"metrics written to {result.written}")


@command()
def report(run_dir: Path = typer.Argument(..., help="Run directory written by `lmdistill run`.")):
    """Write RUN_DIR/report.html (loss curves, metrics, size and speed, samples)."""
    from lmdistill.eval.report import write_report

    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    console.print(f"wrote {write_report(run_dir)}")


@command()
def wizard(yes: bool = typer.Option(False, "--yes", "-y", help="Take every default answer without asking (scripts)."),
           answers: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                             help="The default answer to one question (its key is shown after it), "
                                                  "e.g. --set approach=distill; repeat it for several questions."),
           restart: bool = typer.Option(False, "--restart", help="Start over: replace an earlier config file and "
                                                                 "delete what an earlier run wrote to the output "
                                                                 "directory (as `lmdistill run CONFIG --restart`). "
                                                                 "Needed when the answers changed.")):
    """Guided set-up, as finetune_cli.py walks it: fine-tuning or distillation, models, data, settings; writes a
    config that `lmdistill run` re-runs, then trains and prints ROUGE-L before and after."""
    from lmdistill.wizard import run_wizard

    defaults = {}
    for item in answers:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: write it as KEY=VALUE, e.g. --set epochs=1")
        defaults[key.strip()] = value
    run_wizard(Console(), yes=yes, defaults=defaults, restart=restart)


@command()
def push(run_dir: Path = typer.Argument(..., help="Run directory; only its final/ is uploaded."),
         repo_id: str = typer.Option(..., "--repo-id", help="Hub repository, e.g. me/my-distilled-model."),
         private: bool = typer.Option(False, "--private", help="Create the Hub repository as private."),
         token: Optional[str] = typer.Option(None, "--token", help="Hub access token with write rights (default: "
                                                                   "HF_TOKEN, or the one `hf auth login` saved).")):
    """Upload the exported student (final/) to the Hugging Face Hub."""
    from lmdistill.export import push_to_hub

    console.print(f"uploaded: {push_to_hub(run_dir, repo_id, token=token, private=private)}")


@command()
def demo(out: Path = typer.Option(Path("demo_out"), "--out", help="Where the demo writes its runs and report."),
         quick: bool = typer.Option(False, "--quick", help="Run a smaller, few-minute version (the tests run it)."),
         seed: int = typer.Option(TrainingSettings.model_fields["seed"].default, "--seed", metavar="N",
                                  help="Training seed (training.seed) of the teacher and the students: the order and "
                                       "mix of their training batches; the data and initial weights stay the same. "
                                       "The default is the pipeline's, which the README's table was measured with."),
         seeds: int = typer.Option(1, "--seeds", min=1, metavar="K",
                                   help="Train the distilled student and the CE-only baseline K times, with training "
                                        "seeds N, N+1, ... (the teacher once, with N): the report shows mean ± std "
                                        "over them and compares the students by their means.")):
    """The embedded demo: train a teacher on a shipped finance task, distill a ~5x smaller student through 3 stages,
    train a CE-only baseline, and write report.html. No hub, no GPU."""
    from lmdistill.demo.demo import run_demo

    run_dir = run_demo(out, quick=quick, seed=seed, seeds=seeds)
    console.print(f"report: {run_dir / 'report.html'}")


def main() -> None:
    _setup_logging()
    try:
        app(standalone_mode=False)
    except LmdistillError as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted")
        sys.exit(130)
    except Exception as err:
        import click
        from typer.exceptions import TyperException

        # Usage errors (no command, an unknown option, a bad value) show themselves and carry their exit codes. typer
        # from 0.2x raises those of the click it vendors (TyperExceptions), not click's own.
        if isinstance(err, (click.exceptions.ClickException, TyperException)) and hasattr(err, "show"):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, (click.exceptions.Exit, typer.Exit)):
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
