"""Sampling settings for `generate`: exactly what `generation:` says, nothing the model's files add.

transformers fills every setting a `generate()` call leaves out from the model's generation_config.json, then from
its own defaults (top_k=50 among them): a call naming only temperature and top_p still samples from a truncated, and
possibly penalised, distribution. So every setting that reshapes the next-token distribution is named here: the
configured temperature/top_k/top_p, and neutral values for the rest. A server (vLLM) likewise applies the model's
generation_config to what a request leaves out, so its request names them too.
"""

from __future__ import annotations

from lmdistill.config import GenerationSettings

# Processors transformers applies in greedy decoding too, set to "off" whatever the model's generation_config says.
_NO_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None,
                  "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0, "min_new_tokens": None,
                  "exponential_decay_length_penalty": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                  "num_beams": 1}
# Warpers used only when sampling: no truncation beyond the configured top_k / top_p.
_NO_WARPERS = {"min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


def generate_kwargs(settings: GenerationSettings) -> dict:
    """Keyword arguments for a transformers `generate()` call that samples as `settings` say (greedy when
    `do_sample` is false)."""
    kwargs = {**_NO_PROCESSORS, "do_sample": settings.do_sample, "max_new_tokens": settings.max_new_tokens}
    if settings.do_sample:
        kwargs.update(_NO_WARPERS, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
    return kwargs


def samples_per_prompt(settings: GenerationSettings) -> int:
    """Generations per prompt: num_samples when sampling, one in greedy decoding (it answers a prompt the same way
    every time, so more would be copies; transformers refuses several greedy return sequences)."""
    return settings.num_samples if settings.do_sample else 1


def server_sampling(settings: GenerationSettings) -> dict:
    """The sampling fields of an OpenAI-compatible /v1/completions request (vLLM's extra fields included); the
    penalties are off in greedy decoding too."""
    penalties = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    if not settings.do_sample:
        return {"temperature": 0.0, **penalties}
    return {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k or -1,
            "min_p": 0.0, **penalties}


def recorded(settings: GenerationSettings) -> dict:
    """The settings each generations line records (its provenance)."""
    return {"temperature": settings.temperature, "top_k": settings.top_k, "top_p": settings.top_p,
            "max_new_tokens": settings.max_new_tokens, "do_sample": settings.do_sample}
