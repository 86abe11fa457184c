"""cache-teacher: content against a plain teacher forward, packing size, resume after a crash, bad inputs."""

import errno
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lmdistill.config import config_from_dict
from lmdistill.errors import CacheError
from lmdistill.teacher import cache as cache_module
from lmdistill.teacher.cache import payload_bytes_per_token
from lmdistill.train.teacher_commands import cache_teacher
from lmdistill.teacher.fingerprint import sha256_file
from lmdistill.teacher.reader import TeacherCache
from lmdistill.train.prepare import prepare


def test_cached_rows_equal_a_plain_teacher_forward(exact_cache, topk_cache, fixture_paths, teacher_config, vocab_size):
    config = config_from_dict(teacher_config())
    prep = prepare(config, load_teacher=False)
    teacher = AutoModelForCausalLM.from_pretrained(fixture_paths["teacher"]).eval()
    exact, topk = TeacherCache(exact_cache), TeacherCache(topk_cache)
    for key, position in (("general", 0), ("domain", 11), ("domain", 15)):
        ex = prep.sources[key][position]
        with torch.no_grad():
            logits = teacher(torch.tensor([ex["input_ids"]])).logits[0, :-1].double()  # [T-1, V], unbatched
        counted = torch.tensor(ex["labels"][1:]) != -100
        ref = torch.log_softmax(logits[counted][:, :vocab_size], dim=-1)  # full-vocabulary normalisation first
        ids, lps, tail = exact.example(key, position)
        assert ids.shape == (int(counted.sum()), vocab_size)
        full = torch.empty_like(ref).scatter_(-1, ids, lps.double())
        torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
        ref2 = torch.log_softmax(logits[counted][:, :vocab_size] / 2.0, dim=-1)  # topk_cache captures at T = 2
        ref_top, ref_ids = ref2.topk(64, dim=-1)
        ids, lps, tail = topk.example(key, position)
        assert lps.dtype == torch.float16 and ids.shape == (len(ref), 64)
        torch.testing.assert_close(lps.double(), ref_top, atol=5e-3, rtol=1e-3)
        assert (ref2.gather(-1, ids) >= ref_top[:, -1:] - 1e-5).all()  # the kept ids are the k most likely
        torch.testing.assert_close(tail.double(), 1 - ref_top.exp().sum(-1), atol=1e-5, rtol=1e-4)


def test_manifest_records_provenance_and_size(topk_cache, vocab_size):
    manifest = json.loads((topk_cache / "manifest.json").read_text())
    assert manifest["k"] == 64 and manifest["temperature"] == 2.0 and manifest["dtype"] == "float16"
    assert manifest["vocab_size"] == vocab_size and manifest["id_bits"] == (vocab_size - 1).bit_length()
    assert set(manifest["sources"]) == {"general", "domain", "eval:domain"}
    assert {"teacher", "teacher_config_hash", "tokenizer_hash", "max_length"} <= set(manifest)
    for shard in manifest["shards"]:
        assert sha256_file(topk_cache / shard["file"]) == shard["sha256"]
        assert shard["end"] - shard["start"] <= 10
    # measured payload per token equals the formula the benchmark uses for V = 151,936
    tensors = [load_file(topk_cache / s["file"]) for s in manifest["shards"]]
    tokens = sum(int(t["offsets"][-1]) for t in tensors)
    payload = sum(t[name].numel() * t[name].element_size() for t in tensors for name in ("ids", "logprobs", "tail"))
    assert payload / tokens == pytest.approx(payload_bytes_per_token(64, vocab_size, "float16"), abs=1.0 / tokens * 8)
    assert 2 * 151936 / payload_bytes_per_token(64, 151936, "float16") >= 1000


class _Killed(BaseException):
    """Stands in for kill -9: nothing in the writer catches it."""


def test_resume_after_a_crash_continues_from_the_last_complete_shard(teacher_config, tmp_path, monkeypatch):
    config = config_from_dict(teacher_config(teacher_cache={"k": 8, "batch_size": 16}))  # one batch per shard
    real_save, calls = cache_module.save_file, []

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            with open(path, "wb") as f:
                f.write(b"half a shard")
            raise _Killed
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(cache_module, "save_file", dying_save)
    with pytest.raises(_Killed):
        cache_teacher(config, out=tmp_path / "c")
    listed = json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]
    assert len(listed) == 2 and list((tmp_path / "c").glob(".*.tmp"))
    kept = {s["file"]: sha256_file(tmp_path / "c" / s["file"]) for s in listed}

    monkeypatch.setattr(cache_module, "save_file", real_save)
    captured = []
    real_capture = cache_module.capture_topk
    monkeypatch.setattr(cache_module, "capture_topk", lambda *a, **kw: captured.append(1) or real_capture(*a, **kw))
    _, resumed = cache_teacher(config, out=tmp_path / "c")
    assert resumed.complete and not list((tmp_path / "c").glob(".*.tmp"))
    assert len(captured) == resumed.total_shards - 2  # only the missing shards ran
    assert {f: sha256_file(tmp_path / "c" / f) for f in kept} == kept
    _, fresh = cache_teacher(config, out=tmp_path / "fresh")
    assert sorted(s.file for s in fresh.shards) == sorted(s.file for s in resumed.shards)
    for shard in fresh.shards:  # same rows; float noise of a first forward pass aside, the same numbers
        a, b = load_file(tmp_path / "fresh" / shard.file), load_file(tmp_path / "c" / shard.file)
        assert all(torch.equal(a[name], b[name]) for name in ("row_ids", "offsets", "ids")), shard.file
        torch.testing.assert_close(a["logprobs"].float(), b["logprobs"].float(), atol=2e-3, rtol=0)
    _, again = cache_teacher(config, out=tmp_path / "c")  # complete: nothing to do
    assert again.shards == resumed.shards


def test_disk_full_mid_write_leaves_no_shard_counted(teacher_config, tmp_path, monkeypatch):
    config = config_from_dict(teacher_config(teacher_cache={"k": 8}))
    real_save, calls = cache_module.save_file, []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(cache_module, "save_file", full_disk)
    with pytest.raises(CacheError) as err:
        cache_teacher(config, out=tmp_path / "c")
    message = str(err.value)
    assert "No space left on device" in message and "shard-000-00001" in message and "resume" in message
    assert "\n" not in message
    assert not list((tmp_path / "c").glob(".*.tmp")) and not (tmp_path / "c" / "shard-000-00001.safetensors").exists()
    assert [s["file"] for s in json.loads((tmp_path / "c" / "manifest.json").read_text())["shards"]] == [
        "shard-000-00000.safetensors"]


def test_k_larger_than_vocab_and_other_settings_in_the_folder(teacher_config, tmp_path, vocab_size):
    config = config_from_dict(teacher_config(teacher_cache={"k": 4}, stages=[{"name": "s", "max_steps": 1}]))
    with pytest.raises(CacheError, match=f"k = {vocab_size + 1} is larger than the vocabulary"):
        cache_teacher(config, out=tmp_path / "c", k=vocab_size + 1)
    cache_teacher(config, out=tmp_path / "c")
    with pytest.raises(CacheError, match="other settings \\(k: cached 4, now 5\\)"):
        cache_teacher(config, out=tmp_path / "c", k=5)
