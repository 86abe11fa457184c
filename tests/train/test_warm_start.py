"""The warning before a mode-seeking stage trains a student that was never trained."""

import logging

import torch
from transformers import AutoModelForCausalLM

from lmdistill.config import StageSettings
from lmdistill.data.tokenize import encode_rows
from lmdistill.train.warm_start import mode_seeking, warn_if_cold_start


def _stage(kind="distill", loss="reverse_kl"):
    return StageSettings(name="s", kind=kind, losses=[{"name": loss}])


def test_mode_seeking_stages():
    assert "reverse_kl" in mode_seeking(_stage())
    assert "skew_reverse_kl" in mode_seeking(_stage(loss="skew_reverse_kl"))
    assert "on-policy" in mode_seeking(_stage(kind="policy", loss="forward_kl"))
    assert mode_seeking(_stage(loss="forward_kl")) is None


def test_warns_for_a_random_student_only(student_dir, tokenizer, corpus, caplog):
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    examples = encode_rows([{"text": t, "row_id": i} for i, t in enumerate(corpus[:8])], tokenizer,
                           max_length=32).examples
    vocab = student.get_output_embeddings().weight.shape[0]
    with caplog.at_level(logging.WARNING):
        assert warn_if_cold_start(_stage(), student, {"general": examples}, vocab)
    assert "looks untrained" in caplog.text and "forward_kl or cross_entropy stage first" in caplog.text
    assert not warn_if_cold_start(_stage(loss="forward_kl"), student, {"general": examples}, vocab)

    # a few steps of CE on the probed texts: no longer a uniform guess, no warning
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    batch = torch.tensor([ex["input_ids"][:8] for ex in examples])
    for _ in range(15):
        optimizer.zero_grad()
        student(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    assert not warn_if_cold_start(_stage(), student, {"general": examples}, vocab)


def test_a_sharded_student_is_not_probed(caplog, monkeypatch):
    """The probe runs on the main process alone: a student sharded over the processes (FSDP, DeepSpeed ZeRO-3), whose
    forward passes are collective, would hang the others there, so it is skipped with a note; a whole one is probed."""
    import lmdistill.train.warm_start as warm_start

    vocab, probed = 16, []
    monkeypatch.setattr(warm_start, "perplexity", lambda model, rows, batch_size: probed.append(rows) or float(vocab))
    student = torch.nn.Linear(4, vocab)
    sources = {"general": [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]}
    assert warn_if_cold_start(_stage(), student, sources, vocab)
    assert len(probed) == 1
    for p in student.parameters():
        p.ds_id = 0  # as DeepSpeed ZeRO-3 marks the parameters it partitions
    with caplog.at_level(logging.INFO):
        assert not warn_if_cold_start(_stage(), student, sources, vocab)
    assert len(probed) == 1
    assert "student is sharded over the processes" in caplog.text and "check" in caplog.text
