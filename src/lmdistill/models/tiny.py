"""Small models and tokenizers built locally, with no hub: used by the demo and the tests.

`train_tokenizer` is a byte-level BPE (GPT-2 / Qwen style: no BOS) with a ChatML-style chat template;
`train_metaspace_tokenizer` is a SentencePiece-style BPE (Llama / Mistral style: metaspace pre-tokenisation, byte
fallback, a BOS in front) with a Zephyr-style template. Both exercise the same code paths (chat templates, special
tokens, padding) as hub tokenizers, and together they differ the way real model families differ.
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _chatml_wrapped(tok, chat_template)


def tokenizer_from_merges(merges: list[tuple[str, str]], chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE like train_tokenizer's, built directly from merges (each part a byte-level symbol or an
    earlier merge's result) instead of trained: large vocabularies (e.g. 150k) in seconds, for benchmarks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(dict.fromkeys(
        SPECIAL_TOKENS + pre_tokenizers.ByteLevel.alphabet() + [a + b for a, b in merges]))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _chatml_wrapped(tok, chat_template)


def _chatml_wrapped(tok, chat_template: bool) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


METASPACE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_metaspace_tokenizer(texts: Iterable[str], vocab_size: int = 768,
                              chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Train a SentencePiece-style BPE on `texts`: "▁" marks spaces, unknown characters fall back to their UTF-8
    bytes (<0xE4> ...), and every encoding starts with <s>, as Llama's tokenizer does."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 256, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # Byte fallback needs the 256 byte tokens in the model's vocabulary (ordinary tokens, so decoding keeps them).
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>")
    if chat_template:
        wrapped.chat_template = METASPACE_CHAT_TEMPLATE
    return wrapped


def tiny_causal_lm(vocab_size: int, num_layers: int, hidden_size: int, num_heads: int = 4, seed: int = 0,
                   max_position_embeddings: int = 512, tie_word_embeddings: bool = False, **extra) -> LlamaForCausalLM:
    """A Llama-architecture causal LM of the given size, randomly initialised with a fixed seed."""
    import torch

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        **extra,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_seq2seq_lm(vocab_size: int, num_layers: int, d_model: int, num_heads: int = 4, seed: int = 0) -> T5ForConditionalGeneration:
    """A T5-architecture encoder-decoder of the given size, randomly initialised with a fixed seed."""
    import torch

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_model * 4,
        num_layers=num_layers,
        num_decoder_layers=num_layers,
        num_heads=num_heads,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)
