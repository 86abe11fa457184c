"""Thinking modes: what each kind of tokenizer gets, the share per mode, and seed 003's alpha/beta."""

import logging

import pytest
from transformers import AutoTokenizer

from lmdistill.config import GenerationSettings, config_from_dict
from lmdistill.errors import ConfigError
from lmdistill.teacher.thinking import thinking_modes
from lmdistill.train.stage import logit_terms

QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
CHAT = [{"role": "user", "content": "What does the bank report?"}]


def _prompt_ids(tok, **kw):
    return tok(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False, **kw),
               add_special_tokens=False)["input_ids"]


def test_enable_thinking_template_gets_the_flag(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = QWEN3_LIKE
    modes = thinking_modes(tok, GenerationSettings(thinking_prob=0.5), seed=0)
    prompt = _prompt_ids(tok)
    assert modes.apply(prompt, thinking=False) == _prompt_ids(tok, enable_thinking=False)
    assert modes.apply(prompt, thinking=True) == _prompt_ids(tok, enable_thinking=True) == prompt


def test_other_templates_get_a_system_turn(tokenizer):
    settings = GenerationSettings(thinking_prob=0.5, thinking_system="Reason first.", non_thinking_system="Be brief.")
    modes = thinking_modes(tokenizer, settings, seed=0)
    prompt = _prompt_ids(tokenizer)
    for thinking, text in ((True, "Reason first."), (False, "Be brief.")):
        want = tokenizer.apply_chat_template([{"role": "system", "content": text}] + CHAT, add_generation_prompt=True,
                                             tokenize=False)
        assert tokenizer.decode(modes.apply(prompt, thinking)) == want


def test_plain_prompts_get_a_system_block_after_bos(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    tok.bos_token = "<|im_start|>"  # a bos distinct from eos, as the plain template puts in front
    modes = thinking_modes(tok, GenerationSettings(thinking_prob=1.0), seed=0)
    prompt = [tok.bos_token_id] + tok("### User:\nHi\n\n### Assistant:\n", add_special_tokens=False)["input_ids"]
    assert tok.decode(modes.apply(prompt, True)) == "<|im_start|>### System:\n/think\n\n### User:\nHi\n\n### Assistant:\n"


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_share_follows_thinking_prob_and_is_fixed_by_seed(tokenizer, prob):
    modes = thinking_modes(tokenizer, GenerationSettings(thinking_prob=prob), seed=0)
    draws = [modes.is_thinking(f"src:{i}") for i in range(20000)]
    assert abs(sum(draws) / len(draws) - prob) < 0.01
    assert draws == [modes.is_thinking(f"src:{i}") for i in range(20000)]
    assert thinking_modes(tokenizer, GenerationSettings(), seed=0) is None  # unset: prompts as they are


def test_seed_003_alpha_beta_and_ambiguous_alpha(s2w_config, caplog):
    data = s2w_config()
    stage = {"name": "np", "kind": "non_policy", "max_steps": 1, "alpha": 0.7, "beta": 0.3,
             "losses": [{"name": "forward_kl"}]}
    config = config_from_dict({**data, "stages": [stage]})
    with caplog.at_level(logging.INFO):
        terms = logit_terms(config.stages[0])
    assert [(t.name, t.weight) for t in terms] == [("forward_kl", 0.7), ("cross_entropy", 0.3)]
    assert "alpha (KD) / beta (CE)" in caplog.text
    with pytest.raises(ConfigError, match=r"stages\[0\]: alpha alone is ambiguous.*add beta"):
        config_from_dict({**data, "stages": [{**stage, "beta": None}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]: beta .* goes with alpha"):
        config_from_dict({**data, "stages": [{**stage, "kind": "distill"}]})
    with pytest.raises(ConfigError, match=r"policy stage .* teacher_source: live"):
        config_from_dict({**data, "stages": [{"name": "p", "kind": "policy", "teacher_source": "cache"}]})
