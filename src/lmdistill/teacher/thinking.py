"""Thinking and non-thinking modes (seed 003): the same prompt, asked to reason first or to answer directly.

The mode is applied to already tokenised prompts (the prompt part of an encoded example), so the ids a model is
given are exactly the ids recorded:

* chat templates that take `enable_thinking` (Qwen3): the template itself says which mode; the ids the template
  adds for a mode (Qwen3 non-thinking: an empty `<think></think>` block after the assistant header) are found by
  rendering a probe conversation both ways, and appended to the prompt;
* other chat templates: a system turn with `thinking_system` / `non_thinking_system` is put in front;
* no chat template: the plain template's `### System:` block with that text is put in front (after a bos token).

The mode is drawn per row from a hash of (seed, key), so a rerun or a resumed run picks the same modes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from lmdistill.config import GenerationSettings
from lmdistill.data.render import PLAIN_HEADERS, PLAIN_SEPARATOR
from lmdistill.errors import ConfigError

_PROBE = [{"role": "user", "content": "PROBE"}]


@dataclass(frozen=True)
class ThinkingModes:
    """How to turn a prompt into its thinking / non-thinking version, and which rows get which mode."""

    prob: float
    seed: int
    thinking_ids: tuple[int, ...]
    non_thinking_ids: tuple[int, ...]
    at_end: bool  # True: the mode ids follow the prompt (enable_thinking templates); False: they lead it
    lead_id: int | None = None  # a bos token the mode ids go after when they lead

    def is_thinking(self, key: str | int) -> bool:
        """The mode of one row: thinking with probability `prob`, the same on every call for the same key."""
        digest = hashlib.sha256(f"{self.seed}:thinking:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2 ** 64 < self.prob

    def apply(self, prompt_ids: list[int], thinking: bool) -> list[int]:
        """The prompt ids of one row in the given mode."""
        mode = list(self.thinking_ids if thinking else self.non_thinking_ids)
        if self.at_end:
            return list(prompt_ids) + mode
        head = 1 if self.lead_id is not None and prompt_ids[:1] == [self.lead_id] else 0
        return list(prompt_ids[:head]) + mode + list(prompt_ids[head:])


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _template_suffix(tokenizer, enable: bool) -> list[int]:
    """The ids a template adds after the default generation prompt when called with enable_thinking=enable."""
    default = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False)
    moded = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=True, tokenize=False, enable_thinking=enable)
    if not moded.startswith(default):
        raise ConfigError("the chat template's enable_thinking changes the prompt other than at its end, so the mode "
                          "cannot be applied to tokenised prompts; set generation.thinking_prob: null")
    return _ids(tokenizer, moded[len(default):]) if moded != default else []


def _system_ids(tokenizer, text: str, templated: bool) -> list[int]:
    if not templated:
        return _ids(tokenizer, PLAIN_HEADERS["system"] + text + PLAIN_SEPARATOR)
    try:
        rendered = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=False)
    except Exception as e:  # jinja's TemplateError, or whatever the template's raise_exception raises
        raise ConfigError(f"the chat template cannot render a system turn for thinking modes ({e}); set "
                          "generation.thinking_prob: null") from None
    ids = _ids(tokenizer, rendered)
    bos = tokenizer.bos_token_id
    # A template that starts every conversation with bos: the prompt already has it.
    return ids[1:] if bos is not None and ids[:1] == [bos] else ids


def thinking_modes(tokenizer, settings: GenerationSettings, seed: int) -> ThinkingModes | None:
    """The modes for this tokenizer and settings; None when `thinking_prob` is unset (prompts stay as they are)."""
    if settings.thinking_prob is None:
        return None
    template = getattr(tokenizer, "chat_template", None) or ""
    if "enable_thinking" in template:
        return ThinkingModes(settings.thinking_prob, seed, tuple(_template_suffix(tokenizer, True)),
                             tuple(_template_suffix(tokenizer, False)), at_end=True)
    bos = tokenizer.bos_token_id
    return ThinkingModes(settings.thinking_prob, seed,
                         tuple(_system_ids(tokenizer, settings.thinking_system, bool(template))),
                         tuple(_system_ids(tokenizer, settings.non_thinking_system, bool(template))),
                         at_end=False, lead_id=bos if bos is not None and bos != tokenizer.eos_token_id else None)
