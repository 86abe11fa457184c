"""Config rules for where each stage's teacher comes from: several teachers (`teachers:`), an earlier stage's
student (`teacher: {from_stage: ...}`), the student's own moving average (`teacher: {self: ema}`), and a stage's
student cut from its teacher (`student: {from_teacher: ...}`). Checked at load, so a bad chain fails before any
model is read."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lmdistill.loss_config import AttentionTerm, ContrastiveTerm, CrossVocabTerm, FeatureTerm

if TYPE_CHECKING:
    from lmdistill.config import PipelineConfig, StageSettings, TeacherSettings

HIDDEN_TERMS = (FeatureTerm, AttentionTerm, ContrastiveTerm)


def uses_run_teachers(stage: StageSettings) -> bool:
    """The stage distils from the run's teacher(s), not from a stage teacher of its own."""
    return stage.kind != "finetune" and stage.teacher is None


def check_teachers(config: PipelineConfig) -> TeacherSettings | None:
    """Raises ValueError on a bad teacher set-up; returns the first of `teachers:` as the run's primary teacher."""
    from lmdistill.config import TeacherSettings

    _check_chain(config)
    if not config.teachers:
        return None
    names = [t.name for t in config.teachers]
    if any(not name for name in names):
        raise ValueError("every entry of teachers needs a name (hub name or local folder)")
    if config.teacher.name and config.teacher.name != names[0]:
        raise ValueError("give the teachers either as teacher (one) or as teachers (several), not both")
    routed: dict[str, str] = {}
    for entry in config.teachers:
        for source in entry.sources or []:
            if source not in config.data.sources:
                raise ValueError(f"teacher {entry.name!r} is routed source {source!r}, but data.sources has "
                                 f"{sorted(config.data.sources)}")
            if source in routed:
                raise ValueError(f"source {source!r} is routed to two teachers ({routed[source]!r} and "
                                 f"{entry.name!r}); give each source one teacher")
            routed[source] = entry.name
    if len(config.teachers) > 1:
        for stage in config.stages:
            if uses_run_teachers(stage):
                _check_mixture_stage(stage, routed=bool(routed), cache_temperature=config.teacher_cache.temperature)
    first = config.teachers[0]
    return TeacherSettings.model_validate(first.model_dump(exclude={"weight", "sources"}, exclude_unset=True))


def _check_mixture_stage(stage: StageSettings, routed: bool, cache_temperature: float) -> None:
    """Several teachers meet in their output distributions: the paths that need one teacher's hidden states are
    refused with what to do instead."""
    where = f"stage {stage.name!r} distils from several teachers"
    cached = stage.teacher_source == "cache"
    if stage.fused and routed and not cached:
        raise ValueError(f"{where}: fused: true mixes every teacher on every example, so per-source routing "
                         "(sources:) needs fused: false or teacher_source: cache")
    if cached and stage.temperature != cache_temperature:
        # The cache holds the mixture formed at its capture temperature; re-tempering a mixture is not the mixture
        # of the re-tempered teachers.
        raise ValueError(f"{where} through the teacher cache, which holds their mixture at teacher_cache.temperature "
                         f"{cache_temperature}, but the stage trains at temperature {stage.temperature}: set "
                         f"teacher_cache.temperature: {stage.temperature}")
    bad = [t.name for t in stage.losses if isinstance(t, (*HIDDEN_TERMS, CrossVocabTerm))]
    if bad:
        raise ValueError(f"{where}: {bad[0]} compares one teacher's hidden states or tokens; keep logit losses "
                         "only, or distil that stage from one teacher")


def _check_chain(config: PipelineConfig) -> None:
    earlier: list[str] = []
    for stage in config.stages:
        spec = stage.teacher
        if spec is not None:
            if stage.kind == "finetune":
                raise ValueError(f"stage {stage.name!r} is a finetune stage, which uses no teacher; remove its teacher")
            if spec.from_stage is not None and spec.from_stage not in earlier:
                raise ValueError(f"stage {stage.name!r} takes its teacher from stage {spec.from_stage!r}, which is "
                                 f"not an earlier stage (earlier: {earlier})")
            if stage.teacher_source != "live" or stage.fused:
                raise ValueError(f"stage {stage.name!r}: a stage teacher runs live beside the student: set "
                                 "teacher_source: live and fused: false")
            if any(isinstance(t, CrossVocabTerm) for t in stage.losses):
                raise ValueError(f"stage {stage.name!r}: a stage teacher shares the student's tokenizer; drop the "
                                 "cross-vocabulary loss")
        if stage.student is not None:
            if spec is not None and spec.self_ is not None:
                raise ValueError(f"stage {stage.name!r}: self: ema copies the student, so the student cannot also "
                                 "be cut from that teacher; remove the stage's student")
            if config.student.lora is not None:
                raise ValueError(f"stage {stage.name!r} cuts a new student from its teacher, which student.lora "
                                 "would leave frozen under adapters; remove student.lora for chained runs")
        earlier.append(stage.name)
