"""Model and tokenizer loading through the user code path: vocab checks, pad fallback, layer-dropping errors."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.config import FromTeacher, ModelSettings
from lmdistill.errors import ModelError
from lmdistill.models.load import load_model, load_tokenizer
from lmdistill.models.student_init import evenly_spaced_layers, student_from_teacher
from lmdistill.models.tiny import train_tokenizer
from lmdistill.models.vocab import check_same_vocab


def test_same_vocab_with_padded_embedding_rows(tokenizer):
    # Qwen2.5-style: the output layer has more rows than the tokenizer has ids; the shared size is the tokenizer's.
    assert check_same_vocab(tokenizer, tokenizer, len(tokenizer) + 128, len(tokenizer)) == len(tokenizer)


def test_different_vocab_names_first_differing_tokens(tokenizer, corpus):
    other = train_tokenizer(reversed(corpus), vocab_size=600)
    with pytest.raises(ModelError) as err:
        check_same_vocab(tokenizer, other, len(tokenizer), len(other))
    message = str(err.value)
    assert "tokenizers differ" in message and "first differences: id " in message and "teacher_source: generations" in message


def test_tokenizer_without_pad_uses_eos_with_warning(tokenizer_dir, tmp_path, caplog):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = load_tokenizer(str(tmp_path))
    assert loaded.pad_token == loaded.eos_token
    assert "no pad token" in caplog.text


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(ModelSettings(), "causal", device=torch.device("cpu"), name=str(tmp_path / "nope"))


def test_layer_dropping_keeps_chosen_layers(teacher_dir, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = student_from_teacher(teacher, FromTeacher(keep_layers=[0, 3]))
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    student.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config.num_hidden_layers == 2
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)
    assert evenly_spaced_layers(8, 3) == [0, 4, 7]
    with pytest.raises(ModelError, match="must be distinct indices in \\[0, 3\\]"):
        student_from_teacher(teacher, FromTeacher(keep_layers=[0, 9]))
