"""The multi-stage pipeline: load once, run each stage from the previous stage's best student, resume on re-run.

    run_pipeline(config)
      prepare()          tokenizers, vocab check, data, teacher (prepare.py)
      for each stage:    skip if done; student <- previous best; train (resume from last checkpoint); save best/final
      evaluate           teacher and starting student, then the final student (metrics.json)
      finish             export final/ (model card), report.html

Under torchrun / accelerate launch every process runs this same function: all of them train (Trainer shards the
batches), and the main process alone writes files (state, config, final/, best/, metrics, report) while the
others wait for it (processes.py). A teacher sharded over the processes (teacher.shard) runs only with all of them,
so every process then scores and the main one writes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from lmdistill.config import CONFIG_FILE, CrossVocabTerm, PipelineConfig, StageSettings, save_config
from lmdistill.data.collate import DistillCollator
from lmdistill.errors import ConfigError
from lmdistill.models.load import apply_lora, load_student
from lmdistill.teacher.generations import ensure_generations
from lmdistill.teacher.served_scoring import served_scorer
from lmdistill.teacher.stage import needs_live_teacher, open_stage_cache, stage_training_sources
from lmdistill.eval.samples import SamplesCallback
from lmdistill.train.args import early_stopping, stage_training_arguments
from lmdistill.train.adalora import ADALORA_FILE
from lmdistill.train.cross_cache import cached_cross_vocab
from lmdistill.train.cross_tokenizer import cross_vocab_stage
from lmdistill.train.balancing import BALANCER_FILE
from lmdistill.train.epochs import SourceEpochs
from lmdistill.train.feedback import STATE_FILE as FEEDBACK_FILE, EvalDrivenSampling
from lmdistill.train.finish import evaluate_roles, export_final, generation_prompts, report
from lmdistill.train.onpolicy import OnPolicyTrainer, policy_options, policy_sources
from lmdistill.train.prepare import Prepared, prepare, saved_student_init
from lmdistill.train.processes import launched_processes, main_writes, scores_and_writes
from lmdistill.train.rerun import check_same_config, clear_run
from lmdistill.train.served import served_run
from lmdistill.train.stage import (ListDataset, build_aux, build_balancer, build_objective, build_train_dataset,
                                   write_seed_aliases)
from lmdistill.train.ema import EMA_FILE, EmaTeacher
from lmdistill.train.stage_models import (log_resident, route_sources, stage_student, stage_teacher,
                                         teacher_shard_settings)
from lmdistill.train.state import PipelineState, replace_dir_atomic
from lmdistill.train.trainer import DistillationTrainer
from lmdistill.train.warm_start import warn_if_cold_start

log = logging.getLogger(__name__)

STAGE_KINDS = {"all": None, "non_policy": {"non_policy"}, "policy": {"policy"}}


def selected_stages(config: PipelineConfig, start_stage: int | None, end_stage: int | None,
                    kinds: str = "all") -> list[tuple[int, StageSettings]]:
    """1-based slice of the stage list, then filtered by kind (seed 003's --stage non_policy|policy)."""
    n = len(config.stages)
    start, end = start_stage or 1, end_stage or n
    if not 1 <= start <= end <= n:
        raise ConfigError(f"--start_stage {start} / --end_stage {end} must satisfy 1 <= start <= end <= {n}")
    chosen = [(i, s) for i, s in enumerate(config.stages, start=1) if start <= i <= end]
    wanted = STAGE_KINDS[kinds]
    if wanted is not None:
        chosen = [(i, s) for i, s in chosen if s.kind in wanted]
        if not chosen:
            raise ConfigError(f"--stage {kinds}: this config has no stage of kind {kinds!r} (its kinds: "
                              f"{sorted({s.kind for s in config.stages})}); see `lmdistill init --preset strong-to-weak`")
    return chosen


def _save_trained(trainer: DistillationTrainer, target: Path) -> None:
    """The trained student into `target`, atomically. Every process calls it: Trainer gathers sharded (FSDP, ZeRO-3)
    weights collectively and writes on the main process only."""
    tmp = target.with_name(f".{target.name}.tmp")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))
    if main:
        (tmp / "training_args.bin").unlink(missing_ok=True)
        replace_dir_atomic(tmp, target)
    trainer.accelerator.wait_for_everyone()


def _copy_checkpoint_model(checkpoint: Path, tokenizer, target: Path) -> None:
    """A Trainer checkpoint minus optimizer/scheduler/rng state: the weights (or adapters), the learned loss
    projections (aux_terms.safetensors, as final/ has them) and the tokenizer."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Training state, not the model: Trainer's, ours, and DeepSpeed's (global_stepN/ shards, `latest`, its script).
    skip = {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", BALANCER_FILE, FEEDBACK_FILE,
            ADALORA_FILE, EMA_FILE, "latest", "zero_to_fp32.py"}
    skip_prefixes = ("rng_state", "replay_buffer_", "global_step")
    shutil.copytree(checkpoint, tmp,
                    ignore=lambda d, names: [n for n in names if n in skip or n.startswith(skip_prefixes)])
    tokenizer.save_pretrained(tmp)
    replace_dir_atomic(tmp, target)


def last_checkpoint(stage_dir: Path) -> Path | None:
    """The stage's newest complete checkpoint. Trainer writes trainer_state.json last, and not atomically: a run
    killed while writing it leaves the file cut short (not JSON), and that checkpoint is passed over."""
    checkpoints = [p for p in stage_dir.glob("checkpoint-*") if _complete(p)]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1])) if checkpoints else None


def _complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def stage_callbacks(config: PipelineConfig, prep: Prepared, stage: StageSettings, stage_dir: Path, train_dataset,
                    teacher) -> list:
    """Epochs counted over the sources; quality samples at every evaluation, and evaluation-driven sampling when the
    stage asks for it."""
    callbacks = [SourceEpochs(passes=train_dataset.passes)]
    if teacher is None or not prep.eval_sets:
        return callbacks
    prompts, _, modes = generation_prompts(config, prep.eval_sets, prep.tokenizer, prep.task_type)
    if prompts and config.evaluation.num_samples:
        count = config.evaluation.num_samples
        callbacks.append(SamplesCallback(teacher, prep.tokenizer, prompts[:count], stage_dir.parent, stage.name,
                                         max_new_tokens=config.generation.max_new_tokens,
                                         tensorboard_dir=stage_dir / "runs", modes=modes[:count]))
    if stage.eval_driven_sampling is not None and stage.eval_driven_sampling.enabled:
        callbacks.append(EvalDrivenSampling(train_dataset, teacher, prep.eval_sets, stage.eval_driven_sampling,
                                            batch_size=config.training.eval_batch_size))
    return callbacks


def run_stage(config: PipelineConfig, prep: Prepared, index: int, stage: StageSettings, run_dir: Path,
              start_from: str | None) -> tuple[str, str, float | None]:
    """Train one stage; returns (best_path, final_path, best_metric)."""
    stage_dir = run_dir / stage.name
    stage_dir.mkdir(parents=True, exist_ok=True)
    processes = launched_processes(config)
    teacher = stage_teacher(config, prep, stage, run_dir)
    student_settings, start_from = stage_student(prep, stage, teacher, run_dir, start_from,
                                                 lambda write: main_writes(processes, write))
    student = load_student(student_settings, prep.task_type, device=prep.device, teacher=prep.teacher,
                           checkpoint=start_from)
    if config.student.lora is not None:
        student = apply_lora(student, config.student.lora, prep.task_type,
                             total_steps=stage.max_steps or None, seed=config.training.seed)
    ema = EmaTeacher(student, stage.teacher.decay) if stage.teacher and stage.teacher.self_ == "ema" else None
    teacher = ema.model if ema is not None else teacher
    log_resident(stage, prep, teacher, ema is not None)
    objective = build_objective(stage)
    aux = build_aux(stage, student, teacher, seed=config.training.seed)
    if stage.kind == "non_policy":
        # Seed 003's off-policy stage trains on the teacher's responses: written (or finished) here when
        # `lmdistill generate` has not, each process taking its share; a complete file is left as it is.
        ensure_generations(config, prep, processes)
        processes.wait_for_everyone()
    sources = stage_training_sources(config, prep, stage)
    if stage.kind == "policy":
        sources = policy_sources(sources, config.generation, stage.name)
    if processes.is_main_process:
        warn_if_cold_start(stage, student, sources, student.get_output_embeddings().weight.shape[0])
    eval_examples = [ex for rows in prep.eval_sets.values() for ex in rows]
    collator, cross_vocab = DistillCollator(prep.tokenizer.pad_token_id, task_type=prep.task_type), None
    if (cross := cross_vocab_stage(config, prep, stage, sources, eval_examples)) is not None:
        # uld / cross_vocab_kl: every example also carries the teacher's tokens and the aligned positions.
        sources, eval_examples, collator, cross_vocab = cross
    # Trainer splits each global batch over the processes: draw enough examples for all of them.
    train_dataset = build_train_dataset(config, stage, sources, world_size=processes.num_processes)
    eval_examples = route_sources(teacher, train_dataset.names, prep.eval_sets, eval_examples)
    teacher_cache, shared_vocab = None, prep.shared_vocab
    if stage.teacher_source == "cache" and any(isinstance(t, CrossVocabTerm) for t in stage.losses):
        # uld / cross_vocab_kl from a cache captured across tokenizers: pairs and teacher rows by example id.
        cross_vocab, eval_examples = cached_cross_vocab(config, prep, stage, train_dataset.names)
    elif stage.teacher_source == "cache" and objective.needs_teacher:
        # Offline teacher: logits come from the cache by example id; eval examples get ids in the same space.
        teacher_cache, eval_examples, shared_vocab = open_stage_cache(
            config, prep, stage, train_dataset.names, student.get_output_embeddings().weight.shape[0])
    elif prep.served is not None:  # the teacher's top-k (and seq_kd samples) from its server, as the stage trains
        teacher_cache = served_scorer(config, prep.served, stage, objective.needs_teacher, shared_vocab)
    args = stage_training_arguments(config, stage, stage_dir, has_eval=bool(eval_examples),
                                    epochs=train_dataset.passes)
    trainer_cls, policy = (OnPolicyTrainer, policy_options(config, prep.tokenizer, stage)) if stage.kind == "policy" \
        else (DistillationTrainer, {})
    trainer = trainer_cls(
        model=student, args=args, train_dataset=train_dataset,
        eval_dataset=ListDataset(eval_examples) if eval_examples else None,
        data_collator=collator,
        processing_class=prep.tokenizer, objective=objective, teacher=teacher, aux=aux, balancer=build_balancer(stage),
        task_type=prep.task_type, shared_vocab=shared_vocab, fused=stage.fused, teacher_cache=teacher_cache,
        cross_vocab=cross_vocab, teacher_shard=teacher_shard_settings(config, teacher), **policy,
    )
    for callback in stage_callbacks(config, prep, stage, stage_dir, train_dataset,
                                    prep.scoring_teacher) + early_stopping(config):
        trainer.add_callback(callback)
        if isinstance(callback, EvalDrivenSampling):
            trainer.checkpoint_writers.append(callback.save)
    resume = last_checkpoint(stage_dir)
    if resume:
        log.info("stage %s: resuming from %s", stage.name, resume)
    if ema is not None:
        trainer.add_callback(ema)
        trainer.checkpoint_writers.append(ema.save)
        if resume and not ema.load(resume):
            log.warning("stage %s: %s holds no EMA teacher; the average restarts from the student", stage.name, resume)
    log.info("stage %d/%d %s: %d draws from %s, losses %s, T=%s", index, len(config.stages), stage.name,
             len(train_dataset), train_dataset.names,
             [(t.name, t.weight) for t in objective.terms], stage.temperature)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final_dir, best_dir = stage_dir / "final", stage_dir / "best"
    _save_trained(trainer, final_dir)
    best_ckpt = trainer.state.best_model_checkpoint
    if best_ckpt and Path(best_ckpt).exists():
        main_writes(processes, lambda: _copy_checkpoint_model(Path(best_ckpt), prep.tokenizer, best_dir))
    else:
        _save_trained(trainer, best_dir)
    main_writes(processes, lambda: (stage_dir / "log_history.json").write_text(
        json.dumps(trainer.state.log_history, indent=1)))
    main_writes(processes, lambda: write_seed_aliases(stage, stage_dir))
    if trainer.is_deepspeed_enabled:
        # Trainer's ZeRO-3 config stays registered with transformers, which would then load every later model
        # (the next stage's student, the final one scored and exported) partitioned, with no engine to run it.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return str(best_dir), str(final_dir), trainer.state.best_metric


def loads_teacher(config: PipelineConfig, stages: list[StageSettings]) -> bool:
    """A stage runs the teacher, or the run is scored against it: a config that names a teacher gets its row,
    agreement, KL and samples in the evaluation even when no stage trains on it (CE only), unless a stage reads a
    teacher cache (that run chose not to load the teacher)."""
    if needs_live_teacher(config, stages):
        return True
    return (config.evaluation.enabled and bool(config.teacher.name)
            and not any(stage.teacher_source == "cache" for stage in stages))


def starting_student(config: PipelineConfig, state: PipelineState, first: tuple[int, StageSettings],
                     checkpoint_path: str | None, run_dir: Path) -> str | None:
    """The checkpoint the first selected stage starts from (None: the configured student), said in the log: the
    given checkpoint, else for a slice starting later the previous stage's best in this run directory."""
    index, stage = first
    if checkpoint_path:
        log.info("stage %s starts from the checkpoint %s", stage.name, checkpoint_path)
        return checkpoint_path
    if index == 1:
        return None
    previous = config.stages[index - 2].name
    rec = next((r for r in state.stages if r.name == previous and r.status == "done"), None)
    if rec and rec.best_path and Path(rec.best_path).exists():
        log.info("stage %s starts from stage %s's best student, %s", stage.name, previous, rec.best_path)
        return rec.best_path
    configured = config.student.name or "the student built from the teacher's layers"
    log.warning("stage %s starts from the configured student %s: %s holds no finished stage %s and no "
                "--checkpoint_path was given", stage.name, configured, run_dir, previous)
    return None


def run_pipeline(config: PipelineConfig, *, start_stage: int | None = None, end_stage: int | None = None,
                 checkpoint_path: str | None = None, kinds: str = "all", restart: bool = False) -> Path:
    """restart: clear what an earlier run wrote to output_dir first; without it a directory made with other
    settings is an error (finished stages and checkpoints are reused only under the config that made them)."""
    run_dir = Path(config.output_dir)
    processes = launched_processes(config)
    if restart:
        main_writes(processes, lambda: clear_run(run_dir, config, CONFIG_FILE))
    else:
        check_same_config(run_dir, config, CONFIG_FILE)
    run_dir.mkdir(parents=True, exist_ok=True)
    main_writes(processes, lambda: save_config(config, run_dir / CONFIG_FILE))
    stages = selected_stages(config, start_stage, end_stage, kinds)
    state = PipelineState.load(run_dir)
    served = bool(config.teacher.endpoint)  # the teacher answers from a server (served.py), never loaded here
    prep = prepare(config, load_teacher=loads_teacher(config, [s for _, s in stages]) and not served,
                   shard_teacher=True)
    if served:
        prep = served_run(config, prep, [s for _, s in stages], processes)
    prep.student = saved_student_init(config, prep, run_dir, processes)
    start_from = starting_student(config, state, stages[0], checkpoint_path, run_dir)
    if config.evaluation.enabled:
        scores_and_writes(processes, prep.teacher,
                           lambda write: evaluate_start(config, prep, run_dir, start_from, write))
    for index, stage in stages:
        rec = state.record(stage.name)
        if rec.status == "done" and rec.best_path and Path(rec.best_path).exists():
            log.info("stage %s already done; its best student is %s", stage.name, rec.best_path)
            start_from = rec.best_path
            continue
        rec.status = "running"
        main_writes(processes, lambda: state.save(run_dir))
        best, final, metric = run_stage(config, prep, index, stage, run_dir, start_from)
        rec.status, rec.best_path, rec.final_path = "done", best, final
        rec.best_metric, rec.metric_name = metric, stage.metric_for_best
        main_writes(processes, lambda: state.save(run_dir))
        start_from = best
    scores_and_writes(processes, prep.teacher,
                       lambda write: finish_run(config, prep, run_dir, state, start_from, write))
    return run_dir


def finish_run(config: PipelineConfig, prep: Prepared, run_dir: Path, state: PipelineState,
               student_path: str | None, write: bool = True) -> None:
    """The final student: scored, exported to RUN_DIR/final with its model card, recorded; then the report.
    write=False: score only (a process beside the main one, when the sharded teacher needs every process)."""
    final_model = load_student(prep.student, prep.task_type, device=prep.device, teacher=prep.teacher,
                               checkpoint=student_path)
    if config.evaluation.enabled:
        evaluate_roles(config, run_dir, {"student_after": final_model}, prep.tokenizer, prep.eval_sets,
                       prep.scoring_teacher, prep.task_type, model_dirs={"student_after": student_path}, write=write)
    if not write:
        return
    state.final_path = str(export_final(config, run_dir, final_model, prep.tokenizer))
    state.save(run_dir)
    if config.evaluation.report:
        report(run_dir)


def evaluate_start(config: PipelineConfig, prep: Prepared, run_dir: Path, start_from: str | None,
                   write: bool = True) -> None:
    """Teacher and the starting student, scored once per run directory (kept in metrics.json)."""
    from lmdistill.eval.evaluate import read_metrics

    done = read_metrics(run_dir)
    models = {}
    if prep.scoring_teacher is not None and "teacher" not in done:
        models["teacher"] = prep.scoring_teacher
    if "student_before" not in done:
        models["student_before"] = load_student(prep.student, prep.task_type, device=prep.device,
                                                teacher=prep.teacher, checkpoint=start_from)
    if models:
        evaluate_roles(config, run_dir, models, prep.tokenizer, prep.eval_sets, prep.scoring_teacher, prep.task_type,
                       model_dirs={"teacher": config.teacher.name, "student_before": start_from or prep.student.name},
                       write=write)
