"""A teacher on an OpenAI-compatible server (teacher.endpoint), against a fake server in this process: the cache and
generations it makes equal the in-process ones, they resume, and every fault ends in one clear line."""

import json

import pytest
import torch
from fake_server import FakeServer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.config import config_from_dict, save_config
from lmdistill.teacher.endpoint import Endpoint, EndpointError, EndpointTeacher
from lmdistill.teacher.local_server import free_port
from lmdistill.teacher.manifest import read_manifest, write_manifest
from lmdistill.train.teacher_commands import cache_teacher, generate, with_endpoint

K = 8


@pytest.fixture(scope="module")
def server(teacher_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with FakeServer(model, tokenizer) as fake:
        yield fake


@pytest.fixture(autouse=True)
def _healthy(server):
    server.faults.update(errors=0, malformed=False, fewer=False, delay=0.0, other_tokenizer=False, down_after=None)


def _teacher(server, **kw) -> EndpointTeacher:
    settings = {"timeout": 5.0, "retries": 2, "concurrency": 4, "backoff": 0.01} | kw
    return EndpointTeacher(Endpoint(server.url, **settings), server.name, "teacher", 1024)


def _config(teacher_config, folder, server_url=None, **top):
    data = teacher_config(output_dir=folder / "run", teacher_cache={"k": K, "dtype": "float32",
                                                                   "path": str(folder / "cache")}, **top)
    data["teacher"]["endpoint_retries"] = 1
    if server_url:
        data["teacher"]["endpoint"] = server_url
    return config_from_dict(data)


def test_endpoint_cache_equals_in_process_cache_and_resumes(server, teacher_config, tmp_path):
    local_dir, _ = cache_teacher(_config(teacher_config, tmp_path / "local"))
    served_config = _config(teacher_config, tmp_path / "served", server.url)
    served_dir, manifest = cache_teacher(served_config)
    local = read_manifest(local_dir)
    assert manifest.identity() == local.identity()  # interchangeable: same teacher, same data
    assert (manifest.endpoint, manifest.served_model) == (server.url, server.name)
    for a, b in zip(local.shards, manifest.shards):
        x, y = load_file(local_dir / a.file), load_file(served_dir / b.file)
        assert torch.equal(x["row_ids"], y["row_ids"]) and torch.equal(x["offsets"], y["offsets"])
        assert torch.equal(x["ids"], y["ids"])
        torch.testing.assert_close(y["logprobs"], x["logprobs"], rtol=0, atol=1e-4)
        torch.testing.assert_close(y["tail"], x["tail"], rtol=0, atol=1e-4)

    # A run that died after its first shard: the rerun asks only for the shards not listed.
    first = manifest.shards[0]
    examples = sum(s.end - s.start for s in manifest.shards[1:])
    write_manifest(served_dir, manifest.model_copy(update={"shards": [first]}))
    before = server.requests
    cache_teacher(served_config)
    assert server.requests - before == examples
    def listed(m):
        return [s.model_dump(exclude={"sha256"}) for s in m.shards]

    assert listed(read_manifest(served_dir)) == listed(manifest)


def test_server_that_serves_another_tokenizer_is_refused_with_both_names(server, teacher_config, tmp_path):
    server.faults["other_tokenizer"] = True
    config, before = _config(teacher_config, tmp_path, server.url), server.requests
    with pytest.raises(EndpointError, match=f"serves 'fake-teacher'.*teacher.name '{config.teacher.name}'"):
        cache_teacher(config)
    assert server.requests == before  # refused before any completion was asked for
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_endpoint_generations_equal_in_process_greedy_ones_with_provenance(server, teacher_config, tmp_path):
    generation = {"sources": ["domain"], "num_samples": 1, "max_new_tokens": 6, "batch_size": 3, "do_sample": False}
    local, _ = generate(_config(teacher_config, tmp_path / "local", generation=generation))
    served_config = _config(teacher_config, tmp_path / "served", server.url, generation=generation)
    served, written = generate(served_config)
    a = [json.loads(line) for line in local.read_text().splitlines()]
    b = [json.loads(line) for line in served.read_text().splitlines()]
    assert written == len(b) == len(a) > 0
    for x, y in zip(a, b):
        assert y.pop("served_by") == {"endpoint": server.url, "model": server.name}
        assert x == y
    assert generate(served_config)[1] == 0  # complete: a rerun asks for nothing


def test_fewer_log_probs_than_k_says_how_to_start_the_server(server):
    server.faults["fewer"] = True
    with pytest.raises(EndpointError, match="3 log-probs per token, fewer than k = 4: start it with --max-logprobs 4"):
        _teacher(server).prompt_topk([5, 6, 7], 4)


def test_server_errors_are_retried_until_it_recovers(server):
    server.faults["errors"] = 2
    before = server.requests
    top = _teacher(server, retries=2).prompt_topk([5, 6, 7], 4)
    assert server.requests - before == 3 and len(top) == 3 and len(top[1]) == 4


def test_server_that_stays_down_stops_with_one_line(teacher_config, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(EndpointError, match=r"gave up after 3 tries \(cannot reach .*\); check that it is running") as err:
        Endpoint(url, retries=2, backoff=0.01).request("/models")
    assert "\n" not in str(err.value)
    path = tmp_path / "config.yaml"
    save_config(_config(teacher_config, tmp_path), path)
    result = CliRunner().invoke(app, ["cache-teacher", str(path), "--teacher-endpoint", url])
    assert isinstance(result.exception, EndpointError)  # main() prints it as one line and exits 1
    assert f"teacher server {url}: gave up after 2 tries" in str(result.exception)
    assert not (tmp_path / "cache" / "manifest.json").exists()  # stopped before any work


def test_malformed_answers_and_timeouts_stop_with_one_line(server):
    server.faults["malformed"] = True
    before = server.requests
    with pytest.raises(EndpointError, match="not JSON"):
        _teacher(server).prompt_topk([5, 6, 7], 4)
    assert server.requests - before == 1  # a malformed answer is not retried
    server.faults.update(malformed=False, delay=1.0)
    with pytest.raises(EndpointError, match=r"gave up after 1 tries \(no answer within 0.2 s\)"):
        _teacher(server, timeout=0.2, retries=0).prompt_topk([5, 6, 7], 4)


def test_served_cache_at_another_temperature_is_refused_before_any_work(server, teacher_config, tmp_path):
    from lmdistill.errors import ConfigError

    before = server.requests
    with pytest.raises(ConfigError, match="returns log-probs at temperature 1: capture with --temperature 1"):
        cache_teacher(_config(teacher_config, tmp_path, server.url), temperature=2.0)
    assert server.requests == before


def test_a_mixture_teacher_cannot_be_served(teacher_config, fixture_paths):
    with pytest.raises(Exception, match="only the run's teacher can be served"):
        config_from_dict(teacher_config(teachers=[{"name": str(fixture_paths["teacher"]),
                                                   "endpoint": "http://127.0.0.1:8000/v1"}]))


def test_endpoint_must_be_a_url(teacher_config, tmp_path):
    with pytest.raises(Exception, match="must be an http"):
        with_endpoint(_config(teacher_config, tmp_path), "localhost:8000")


def test_run_with_endpoint_trains_non_policy_on_served_generations(server, teacher_config, tmp_path, monkeypatch):
    from lmdistill.train import pipeline, prepare

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded in-process")

    monkeypatch.setattr(prepare, "frozen_teacher", no_teacher)
    stages = [{"name": "off", "kind": "non_policy", "max_steps": 2, "losses": [{"name": "cross_entropy"}]}]
    config = _config(teacher_config, tmp_path, server.url, stages=stages,
                     generation={"sources": ["domain"], "max_new_tokens": 4, "do_sample": False})
    run_dir = pipeline.run_pipeline(config)
    lines = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert lines and all(line["served_by"]["endpoint"] == server.url for line in lines)
    assert (run_dir / "off" / "final").is_dir()


@pytest.mark.parametrize(("stage", "message"), [
    ({"losses": [{"name": "forward_kl"}, {"name": "feature"}]},
     "stage 'x' \\(its hidden-state / attention terms read the teacher's activations\\) needs it in this process; "
     "remove teacher.endpoint"),
    ({"losses": [{"name": "uld"}]}, "stage 'x''s uld \\(it runs the teacher on its own tokens beside the student\\)"),
    ({"eval_driven_sampling": {}}, "stage 'x''s eval_driven_sampling \\(the teacher scores the eval sets here\\)"),
    ({"kind": "policy", "losses": [{"name": "reverse_kl"}]},
     "stage 'x' trains on reverse_kl, but a served teacher .* gives its top-k log-probs only.*switch the stage to "
     "forward_kl"),
], ids=["hidden-state term", "live cross-vocabulary term", "eval-driven sampling", "not a top-k divergence"])
def test_run_with_endpoint_refuses_what_a_server_cannot_give_before_any_work(stage, message, server, teacher_config,
                                                                             tmp_path):
    from lmdistill.errors import ConfigError
    from lmdistill.train.pipeline import run_pipeline

    before = server.requests
    with pytest.raises(ConfigError, match=message):
        run_pipeline(_config(teacher_config, tmp_path, server.url, stages=[{"name": "x", "max_steps": 1, **stage}]))
    assert server.requests == before and not (tmp_path / "run" / "x").exists()
