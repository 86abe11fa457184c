"""Several teachers in one stage: routing by source, one teacher of weight 1 as today, a pipeline run, and each
teacher sharded (or not) by its own `shard` setting."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from lmdistill.config import config_from_dict
from lmdistill.data.collate import DistillCollator
from lmdistill.data.mixture import ID_STRIDE
from lmdistill.errors import ConfigError, TrainingError
from lmdistill.losses import DistillObjective, LossTerm
from lmdistill.losses.mixture import mixture_logits
from lmdistill.models import load
from lmdistill.models.sharding import is_sharded
from lmdistill.teacher.ensemble import TeacherEnsemble
from lmdistill.train import prepare as prepare_module
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.stage_models import route_sources, run_teachers
from lmdistill.train.trainer import DistillationTrainer


@pytest.fixture(scope="module")
def two_teachers(teacher_dir, student_dir):
    # the student fixture serves as a second teacher of the same vocabulary
    return [AutoModelForCausalLM.from_pretrained(d).eval().requires_grad_(False) for d in (teacher_dir, student_dir)]


def _seen(models):
    """Records the input rows each model ran on."""
    seen = {i: [] for i in range(len(models))}
    for i, model in enumerate(models):
        model.register_forward_hook(lambda m, args, kwargs, out, i=i: seen[i].append(kwargs["input_ids"].clone()),
                                    with_kwargs=True)
    return seen


def test_routing_sends_each_source_to_its_teacher(teacher_dir, student_dir):
    models = [AutoModelForCausalLM.from_pretrained(d).eval() for d in (teacher_dir, student_dir)]
    seen = _seen(models)
    ensemble = TeacherEnsemble(models, [1.0, 1.0], {"domain": 1}, temperature=2.0)
    ensemble.use_source_order(["general", "domain"])  # domain is source 1 in the dataset's ids
    ids = torch.randint(5, 400, (4, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "example_id": torch.tensor([0 * ID_STRIDE + 3, 1 * ID_STRIDE + 0, 1 * ID_STRIDE + 7, 0 * ID_STRIDE + 1])}
    with torch.no_grad():
        own = [m(input_ids=ids).logits for m in models]
        for rows in seen.values():
            rows.clear()
        out = ensemble.for_batch(batch)(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    # the unrouted source (general) goes to the unrouted teacher 0 alone, domain rows to teacher 1 alone
    assert torch.equal(torch.cat(seen[0]), ids[[0, 3]]) and torch.equal(torch.cat(seen[1]), ids[[1, 2]])
    torch.testing.assert_close(out[[0, 3]], own[0][[0, 3]])
    torch.testing.assert_close(out[[1, 2]], own[1][[1, 2]])
    # no ids (a named eval set): every row gets the mixture of the unrouted teacher(s)
    with torch.no_grad():
        plain = ensemble.for_batch({})(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(plain, own[0])


def test_eval_sets_are_routed_like_their_source(two_teachers):
    ensemble = TeacherEnsemble(two_teachers, [1.0, 1.0], {"domain": 1}, temperature=1.0)
    eval_sets = {"domain": [{"row_id": 5}, {"row_id": 6}], "other": [{"row_id": 0}]}
    examples = route_sources(ensemble, ["general", "domain"], eval_sets, [])
    ensemble.for_batch({"example_id": torch.tensor([ex["example_id"] for ex in examples])})
    assert ensemble.assignment(3) == [1, 1, None]  # domain's teacher; a set of no source: the mixture
    alone = [{"row_id": 0}]
    assert route_sources(two_teachers[0], ["general"], {"x": alone}, alone) is alone  # one teacher: untouched


def test_mixture_without_routing_runs_every_teacher(two_teachers):
    seen = _seen(two_teachers)
    ensemble = TeacherEnsemble(two_teachers, [1.0, 3.0], {}, temperature=2.0)
    ids = torch.randint(5, 400, (2, 6))
    with torch.no_grad():
        out = ensemble.for_batch({"example_id": torch.tensor([0, 1])})(input_ids=ids).logits
        expected = mixture_logits([m(input_ids=ids).logits for m in two_teachers], [1.0, 3.0], 2.0)
    assert all(len(rows) >= 1 for rows in seen.values())
    torch.testing.assert_close(out, expected)


def test_one_teacher_of_weight_one_gives_todays_loss_exactly(two_teachers):
    teacher = two_teachers[0]
    ids = torch.randint(5, 400, (2, 8))
    labels = ids[:, 1:]
    student = torch.randn(2, 7, teacher.config.vocab_size, requires_grad=True)
    objective = DistillObjective([LossTerm("forward_kl", 0.7), LossTerm("cross_entropy", 0.3)], temperature=2.0)
    with torch.no_grad():
        alone = teacher(input_ids=ids).logits[:, :-1]
        ensemble = TeacherEnsemble([teacher], [1.0], {}, 2.0).for_batch({})(input_ids=ids).logits[:, :-1]
    assert torch.equal(objective(student, ensemble, labels).total, objective(student, alone, labels).total)


def test_several_teachers_in_a_pipeline(tiny_pipeline, teacher_dir, student_dir, caplog):
    teachers = [{"name": str(teacher_dir), "weight": 2.0}, {"name": str(student_dir), "sources": ["domain"]}]
    stages = [{"name": "mix", "max_steps": 2, "losses": [{"name": "reverse_kl"}, {"name": "cross_entropy"}]},
              {"name": "tune", "kind": "finetune", "max_steps": 1, "losses": [{"name": "cross_entropy"}]}]
    data = tiny_pipeline(stages, teachers=teachers, evaluation={"enabled": False})
    del data["teacher"]
    config = config_from_dict(data)
    assert config.teacher.name == str(teacher_dir)  # the first teacher is the run's teacher (evaluation, samples)
    with caplog.at_level(logging.INFO):
        run_dir = run_pipeline(config)
    assert (run_dir / "mix" / "final" / "model.safetensors").exists()
    lines = [r.getMessage() for r in caplog.records if "teachers resident" in r.getMessage()]
    assert "stage mix" in lines[0] and "teacher 1 (float32)" in lines[0] and "mixture/routing" in lines[0]
    assert "stage tune" in lines[1] and "teacher 1" not in lines[1]  # released: no later stage needs it


@pytest.mark.parametrize("stage,match", [
    ({"teacher_source": "cache", "temperature": 2.0}, "set teacher_cache.temperature: 2.0"),
    ({"losses": [{"name": "forward_kl"}, {"name": "feature"}]}, "keep logit losses only"),
])
def test_paths_one_teacher_needs_are_refused(tiny_pipeline, teacher_dir, stage, match):
    teachers = [{"name": str(teacher_dir)}, {"name": str(teacher_dir), "weight": 2.0}]
    data = tiny_pipeline([{"name": "s", **stage}], teachers=teachers)
    del data["teacher"]
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


def test_routing_names_known_sources_once(tiny_pipeline, teacher_dir):
    for teachers, match in [([{"name": "a", "sources": ["nope"]}], "routed source 'nope'"),
                            ([{"name": "a", "sources": ["domain"]}, {"name": "b", "sources": ["domain"]}],
                             "routed to two teachers"),
                            ([{"name": "a"}, {"dtype": "float32"}], "needs a name"),
                            ([{"name": "a"}, {"name": "b", "endpoint": "http://localhost:8000"}],
                             "only the run.s teacher can be served")]:
        data = tiny_pipeline([{"name": "s"}], teachers=teachers)
        del data["teacher"]
        with pytest.raises(ConfigError, match=match):
            config_from_dict(data)
    with pytest.raises(ConfigError, match="either as teacher"):
        config_from_dict(tiny_pipeline([{"name": "s"}], teachers=[{"name": "other"}]))


def test_fused_mixture_in_the_trainer_equals_the_logits_path(two_teachers, student_dir, tmp_path):
    """fused: true with two teachers at unequal weights: the trainer mixes their heads per chunk, with loss and
    student gradients equal to the logits path on the ensemble's mixed logits."""
    ensemble = TeacherEnsemble(two_teachers, [1.0, 3.0], {}, temperature=2.0)
    objective = DistillObjective([LossTerm("forward_kl", 0.7), LossTerm("cross_entropy", 0.3)], temperature=2.0,
                                 chunk_size=7)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    ids = torch.randint(5, 400, (3, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False,
                             save_strategy="no")
    results = []
    for fused in (False, True):
        trainer = DistillationTrainer(model=student, args=args, data_collator=DistillCollator(0), objective=objective,
                                      teacher=ensemble, fused=fused)
        student.zero_grad()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        results.append((loss.detach(), student.lm_head.weight.grad.clone(),
                        student.model.layers[0].mlp.up_proj.weight.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_several_teachers_run_and_refuse_routing(tiny_pipeline, teacher_dir, student_dir):
    teachers = [{"name": str(teacher_dir), "weight": 2.0}, {"name": str(student_dir)}]
    data = tiny_pipeline([{"name": "mix", "max_steps": 2, "fused": True, "losses": [{"name": "jsd"}]}],
                         teachers=teachers, evaluation={"enabled": False})
    del data["teacher"]
    assert (run_pipeline(config_from_dict(data)) / "mix" / "final" / "model.safetensors").exists()
    teachers[1]["sources"] = ["domain"]
    with pytest.raises(ConfigError, match="per-source routing .sources:. needs fused: false"):
        config_from_dict(data)


def test_each_teacher_is_split_by_its_own_shard_setting(tiny_pipeline, teacher_dir, student_dir, monkeypatch):
    """Under two launched processes, the run's teacher and every other of `teachers:` are loaded sharded or whole as
    their own entry's `shard` says (FSDP2 itself needs the processes: tests/distributed/test_sharded_teacher.py)."""
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    teachers = [{"name": str(teacher_dir), "shard": "always"}, {"name": str(student_dir), "shard": "never"},
                {"name": str(teacher_dir), "shard": "always"}]
    data = tiny_pipeline([{"name": "mix", "losses": [{"name": "forward_kl"}]}], teachers=teachers)
    del data["teacher"]
    config = config_from_dict(data)
    asked = []

    def load_whole(settings, task_type, *, device, name=None, shard_over=1):
        asked.append(shard_over)
        return real_load(settings, task_type, device=device, name=name)  # one process here: nothing to shard over

    real_load = load.load_model
    monkeypatch.setattr(load, "load_model", load_whole)
    monkeypatch.setattr(prepare_module, "launched_processes", lambda config: SimpleNamespace(num_processes=2))
    prep = prepare_module.prepare(config, shard_teacher=True)
    ensemble = run_teachers(config, prep, temperature=1.0)
    assert asked == [2, 1, 2] and len(ensemble.teachers) == 3


def test_a_sharded_teacher_is_not_routed(teacher_dir, student_dir, tmp_path):
    """Routing runs each teacher on other examples on each process, but a sharded teacher's forward passes must
    run on every process together: refused when the trainer is built, with what to do."""
    models = [AutoModelForCausalLM.from_pretrained(d).eval().requires_grad_(False) for d in (teacher_dir, student_dir)]
    models[1]._is_fsdp_managed_module = True  # what transformers marks a model it loaded with FSDP2
    mixed = TeacherEnsemble(models, [1.0, 1.0], {}, temperature=1.0)
    assert is_sharded(mixed) and not is_sharded(TeacherEnsemble(models[:1], [1.0], {}, temperature=1.0))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False,
                             save_strategy="no")
    objective = DistillObjective([LossTerm("forward_kl")])
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    DistillationTrainer(model=student, args=args, objective=objective, teacher=mixed)  # a mixture: every teacher runs
    routed = TeacherEnsemble(models, [1.0, 1.0], {"domain": 1}, temperature=1.0)
    with pytest.raises(TrainingError, match=r"^teachers routed by source .sources:. .*set shard: never on"):
        DistillationTrainer(model=student, args=args, objective=objective, teacher=routed)
