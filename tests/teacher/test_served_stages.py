"""Stages that ask a served teacher as they train (teacher.endpoint; teacher/served_scoring.py), against a fake server
running the tiny teacher in this process: a policy stage's loss through the server equals the in-process teacher's
top-k loss on the same samples; seq_kd samples on the server; policy and non_policy stages train through `run` with
the teacher never loaded in the training process; a server that goes down mid-stage stops it with one line, and the
re-run resumes from the last checkpoint and ends where an uninterrupted run ends."""

import json
import math

import pytest
import torch
from fake_server import FakeServer
from served_reference import chat_batch, policy_trainer, top_k_forward_kl
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.config import GenerationSettings, OnPolicySettings, config_from_dict, save_config
from lmdistill.teacher.endpoint import Endpoint, EndpointError, EndpointTeacher
from lmdistill.teacher.served_scoring import ServedScorer
from lmdistill.train.onpolicy import batch_prompts, sample_batch
from lmdistill.train.pipeline import run_pipeline

K = 8
QUESTIONS = ["What does the bank report?", "What does a trader report?", "What does our fund report?",
             "What does the market report?"]
POLICY = {"name": "p", "kind": "policy", "onpolicy": {"lmbda": 1.0}, "mixture": {"weights": {"domain": 1.0}}}


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval()


@pytest.fixture(scope="module")
def server(teacher, tokenizer):
    with FakeServer(teacher, tokenizer) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _healthy(server):
    server.faults.update(errors=0, malformed=False, fewer=False, delay=0.0, other_tokenizer=False, down_after=None)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return chat_batch(tokenizer, QUESTIONS)


def _scorer(server, k: int, **endpoint) -> ServedScorer:
    settings = {"timeout": 5.0, "retries": 1, "concurrency": 4, "backoff": 0.01} | endpoint
    vocab = len(server.tokenizer)
    return ServedScorer(EndpointTeacher(Endpoint(server.url, **settings), server.name, "teacher", vocab), k, "bucket",
                        vocab)


@pytest.mark.parametrize("k", [K, None], ids=["top-8", "whole-vocabulary"])
def test_policy_loss_through_the_server_equals_the_in_process_teachers_top_k(k, server, teacher, student_dir,
                                                                             tokenizer, batch, tmp_path):
    k = k or len(tokenizer)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    served = policy_trainer(tmp_path, student, tokenizer, teacher_cache=_scorer(server, k))
    live = policy_trainer(tmp_path, student, tokenizer, teacher=teacher)
    before = server.requests
    torch.manual_seed(5)
    # One optimizer step of two micro-batches.
    samples, count = served.get_batch_samples(iter([batch, batch]), 2, torch.device("cpu"))
    torch.manual_seed(5)
    same, _ = live.get_batch_samples(iter([batch, batch]), 2, torch.device("cpu"))
    assert not torch.equal(samples[0]["input_ids"], batch["input_ids"])  # the student's samples, not the batch
    assert all(torch.equal(a[key], b[key]) for a, b in zip(samples, same) for key in b)  # same seed, same samples
    rows = {tuple(row) for sampled in samples for row in sampled["input_ids"].tolist()}
    assert server.requests - before == len(rows)  # the whole step's rows asked for together, once each

    for sampled in samples:
        loss = served.compute_loss(student, sampled, num_items_in_batch=count).item()
        with torch.no_grad():
            s, t = (m(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits[:, :-1]
                    for m in (student, teacher))
        assert loss == pytest.approx(top_k_forward_kl(s, t, sampled["labels"][:, 1:], k) / int(count), abs=1e-5)
        if k == len(tokenizer):  # the whole vocabulary: exactly the loss with the teacher in-process
            want = live.compute_loss(student, sampled, num_items_in_batch=count).item()
            assert loss == pytest.approx(want, abs=1e-5)
    assert server.requests - before == len(rows)  # the losses read the prefetched answers


def test_seq_kd_asks_the_server_for_the_teachers_completions(server, teacher, student_dir, tokenizer, batch,
                                                             tmp_path):
    greedy = GenerationSettings(do_sample=False, max_new_tokens=6)
    trainer = policy_trainer(tmp_path, AutoModelForCausalLM.from_pretrained(student_dir), tokenizer, generation=greedy,
                             onpolicy=OnPolicySettings(lmbda=0.0, seq_kd=True), teacher_cache=_scorer(server, K))
    got = trainer.policy_batch(batch, 0)
    want = sample_batch(teacher, batch_prompts(batch), trainer._collator, greedy, tokenizer.eos_token_id)
    assert all(torch.equal(got[key], want[key]) for key in want) and trainer._counts["teacher"] == 1


def test_faults_while_scoring_a_batch_stop_with_one_line(server, batch):
    target = batch["labels"][:, 1:]
    server.faults["fewer"] = True
    with pytest.raises(EndpointError, match=r"7 log-probs per token, fewer than k = 8: start it with --max-logprobs 8 "
                                            r"\(or more\), or lower teacher_cache.k"):
        _scorer(server, K).lookup(batch, target)
    server.faults.update(fewer=False, malformed=True)
    before = server.requests
    with pytest.raises(EndpointError, match="not JSON"):
        _scorer(server, K).lookup(batch, target)
    assert server.requests - before <= len(QUESTIONS)  # not retried
    server.faults["malformed"] = False
    teacher = EndpointTeacher(Endpoint(server.url), server.name, "teacher", len(server.tokenizer))
    with pytest.raises(EndpointError, match="returned token id [0-9]+, past the 3 ids teacher and student share"):
        ServedScorer(teacher, K, "bucket", 3).lookup(batch, target)
    server.faults["delay"] = 1.0
    with pytest.raises(EndpointError, match=r"gave up after 1 tries \(no answer within 0.2 s\)") as err:
        _scorer(server, K, timeout=0.2, retries=0).lookup(batch, target)
    assert "\n" not in str(err.value)


def _config(teacher_config, folder, stages, endpoint=None, k=K, generation=None):
    data = teacher_config(output_dir=folder / "run", stages=stages, teacher_cache={"k": k},
                          generation=generation or {"max_new_tokens": 4})
    data["teacher"].update(endpoint=endpoint, endpoint_retries=1)
    return config_from_dict(data)


def _teacher_never_loaded(monkeypatch, teacher_dir) -> None:
    """Any attempt to load the teacher's weights in this process fails the test."""
    real = AutoModelForCausalLM.from_pretrained

    def guarded(name, *args, **kwargs):
        if str(name) == str(teacher_dir):
            raise AssertionError("the teacher was loaded in the training process")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", guarded)


def test_policy_stage_trains_through_run_with_teacher_endpoint(server, teacher_config, teacher_dir, tmp_path,
                                                               monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(_config(teacher_config, tmp_path, [{**POLICY, "max_steps": 2}]), path)
    _teacher_never_loaded(monkeypatch, teacher_dir)
    before = server.requests
    result = CliRunner().invoke(app, ["run", str(path), "--teacher-endpoint", server.url])
    assert result.exit_code == 0, (result.output, result.exception)
    steps = [e for e in json.loads((tmp_path / "run" / "p" / "log_history.json").read_text()) if "loss" in e]
    assert len(steps) == 2 and all(e["onpolicy/student_share"] == 1.0 for e in steps)
    assert all(math.isfinite(e["loss/forward_kl"]) and e["loss/forward_kl"] > 0 for e in steps)
    assert server.requests - before >= 2 * len(QUESTIONS)  # every step's rows were scored by the server


def test_stage_test_checks_the_server_without_loading_the_teacher(server, teacher_config, teacher_dir, tmp_path,
                                                                   monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(_config(teacher_config, tmp_path, [{**POLICY, "max_steps": 2}]), path)
    _teacher_never_loaded(monkeypatch, teacher_dir)
    result = CliRunner().invoke(app, ["run", str(path), "--stage", "test", "--teacher-endpoint", server.url])
    assert result.exit_code == 0, (result.output, result.exception)
    assert not (tmp_path / "run").exists()


def test_server_down_mid_stage_stops_with_one_line_and_the_rerun_loses_nothing(server, teacher_config, tmp_path,
                                                                              monkeypatch):
    stages = [{**POLICY, "max_steps": 3, "save_steps": 1}]
    whole = run_pipeline(_config(teacher_config, tmp_path / "whole", stages, server.url)) / "p" / "final"

    steps, prefetch = [], ServedScorer.prefetch

    def going_down_at_step_3(scorer, batches):
        steps.append(len(steps) + 1)
        if len(steps) == 3:
            server.faults["down_after"] = server.requests  # from now on no request is answered
        return prefetch(scorer, batches)

    monkeypatch.setattr(ServedScorer, "prefetch", going_down_at_step_3)
    config = _config(teacher_config, tmp_path / "cut", stages, server.url)
    with pytest.raises(EndpointError, match=r"teacher server .*: gave up after 2 tries \(cannot reach") as err:
        run_pipeline(config)
    assert "\n" not in str(err.value) and "re-run the same command to resume" in str(err.value)
    stage_dir = tmp_path / "cut" / "run" / "p"
    assert (stage_dir / "checkpoint-2").is_dir() and not (stage_dir / "final").exists()
    server.faults["down_after"] = None  # back up
    resumed = run_pipeline(config) / "p" / "final"
    assert steps == [1, 2, 3, 4]  # the re-run trained step 3 only, from checkpoint-2
    a, b = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in (whole, resumed))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


def test_non_policy_logit_kd_through_the_server_trains_as_the_in_process_teacher(server, teacher_config, teacher_dir,
                                                                                  tokenizer, tmp_path, monkeypatch):
    stages = [{"name": "off", "kind": "non_policy", "max_steps": 2, "losses": [{"name": "forward_kl"}]}]
    generation = {"sources": ["domain"], "max_new_tokens": 4, "do_sample": False}
    local = run_pipeline(_config(teacher_config, tmp_path / "local", stages, generation=generation))
    # k = every id: the served top-k loss is the exact one, so both runs must train alike.
    config = _config(teacher_config, tmp_path / "served", stages, server.url, k=len(tokenizer), generation=generation)
    _teacher_never_loaded(monkeypatch, teacher_dir)
    served = run_pipeline(config)
    lines = [json.loads(line) for line in (served / "generations.jsonl").read_text().splitlines()]
    assert lines and all(line["served_by"]["endpoint"] == server.url for line in lines)
    a, b = (AutoModelForCausalLM.from_pretrained(path / "off" / "final").state_dict() for path in (local, served))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5)
