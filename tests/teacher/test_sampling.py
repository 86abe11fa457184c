"""Sampling uses exactly the configured settings: not transformers' top_k=50, not the model's generation_config."""

import pytest
from transformers import AutoModelForCausalLM, GenerationConfig

from lmdistill.config import GenerationSettings
from lmdistill.data.collate import DistillCollator
from lmdistill.eval.metrics import generate_continuations
from lmdistill.teacher.generate import generate_responses
from lmdistill.teacher.sampling import server_sampling
from lmdistill.train.onpolicy import sample_batch

# What a model's generation_config.json may say (Qwen3-style sampling defaults plus penalties and a min_p).
MODEL_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.8, "min_p": 0.3,
                  "typical_p": 0.5, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2}


@pytest.fixture
def spied(teacher_dir):
    """A model whose generation_config truncates and penalises, and the generation config each generate() used."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    model.generation_config = GenerationConfig(**MODEL_DEFAULTS)
    used, real = [], model.generate

    def generate(**kwargs):
        used.append(model._prepare_generation_config(None, **kwargs)[0])
        return real(**kwargs)

    model.generate = generate
    return model, used


def _assert_exactly(config, settings):
    assert (config.do_sample, config.temperature, config.top_k, config.top_p) == \
        (True, settings.temperature, settings.top_k, settings.top_p)
    assert config.min_p is None and config.typical_p == 1.0
    assert config.repetition_penalty == 1.0 and config.no_repeat_ngram_size == 0


@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=3),
                                      GenerationSettings(temperature=0.9, top_k=7, top_p=0.95, max_new_tokens=3)])
def test_policy_samples_with_the_configured_settings_only(spied, tokenizer, settings):
    model, used = spied
    collator = DistillCollator(tokenizer.pad_token_id)
    sample_batch(model, [tokenizer("The bank")["input_ids"]], collator, settings, tokenizer.eos_token_id)
    _assert_exactly(used[0], settings)


def test_teacher_generations_use_the_configured_settings_only(spied, tokenizer, tmp_path):
    model, used = spied
    settings = GenerationSettings(max_new_tokens=3)  # defaults: no truncation at all
    prompt = tokenizer("The bank")["input_ids"]
    example = {"row_id": 0, "input_ids": prompt, "prompt_length": len(prompt)}
    generate_responses(model, tokenizer, {"s": [example]}, tmp_path / "g.jsonl", task_type="causal",
                       settings=settings, seed=0, teacher_name="t", tokenizer_id="x")
    _assert_exactly(used[0], settings)
    assert settings.top_k == 0 and settings.top_p == 1.0


def test_greedy_generation_drops_the_models_penalties(spied, tokenizer):
    model, used = spied
    settings = GenerationSettings(do_sample=False, max_new_tokens=3)
    sample_batch(model, [tokenizer("The bank")["input_ids"]], DistillCollator(tokenizer.pad_token_id), settings,
                 tokenizer.eos_token_id)
    assert used[0].do_sample is False and used[0].repetition_penalty == 1.0 and used[0].no_repeat_ngram_size == 0


def test_quality_samples_are_plain_greedy_whatever_the_checkpoint_says(spied, tokenizer):
    model, used = spied
    generate_continuations(model, tokenizer, ["The bank"], max_new_tokens=3)
    assert used[0].do_sample is False and used[0].repetition_penalty == 1.0 and used[0].no_repeat_ngram_size == 0


def test_server_requests_name_every_sampling_setting():
    # vLLM applies the model's generation_config to fields a request leaves out; top_k -1 is its "no top-k".
    assert server_sampling(GenerationSettings()) == {
        "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0}
    assert server_sampling(GenerationSettings(top_k=5))["top_k"] == 5
    assert server_sampling(GenerationSettings(do_sample=False)) == {
        "temperature": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
