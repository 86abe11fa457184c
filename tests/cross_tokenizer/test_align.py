"""Byte-offset alignment: exact spans on hand-written text, tokenised by a byte-level BPE without BOS (a) and a
metaspace tokenizer with BOS and byte fallback (b)."""

from lmdistill.data.align import Span, align, boundary_pairs, token_ranges


def _spans(tok_a, tok_b, text, contents=None, special=True):
    sides = []
    for tok in (tok_a, tok_b):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=special)
        sides.append((tok.convert_ids_to_tokens(enc.input_ids), token_ranges(enc.offset_mapping, text, contents)))
    (names_a, ranges_a), (names_b, ranges_b) = sides
    spans = align(ranges_a, ranges_b)
    return [(names_a[s.a[0]:s.a[1]], names_b[s.b[0]:s.b[1]]) for s in spans], spans


def test_bos_on_one_side_and_byte_level_vs_metaspace_words(tokenizer, metaspace_tokenizer):
    shown, spans = _spans(tokenizer, metaspace_tokenizer, "The bank reports higher yields today.")
    assert shown == [([], ["<s>"]), (["The"], ["▁The"]), (["Ġbank"], ["▁bank"]), (["Ġreports"], ["▁reports"]),
                     (["Ġhigher"], ["▁higher"]), (["Ġyields"], ["▁yields"]), (["Ġtoday", "."], ["▁today."])]
    # the BOS has no partner before it; then the last token of each span on both sides
    assert boundary_pairs(spans) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (6, 6)]


def test_multibyte_characters_split_into_bytes_stay_in_one_span(tokenizer, metaspace_tokenizer):
    shown, _ = _spans(tokenizer, metaspace_tokenizer, "Hi 中文 ok 🙂!")
    assert shown == [([], ["<s>"]), (["H"], ["▁", "<0x48>"]), (["i"], ["i"]), (["Ġ"], ["▁"]),
                     (["ä", "¸", "Ń"], ["<0xE4>", "<0xB8>", "<0xAD>"]), (["æ", "ĸ", "ĩ"], ["<0xE6>", "<0x96>", "<0x87>"]),
                     (["Ġ"], ["▁"]), (["o"], ["o"]), (["k"], ["k"]), (["Ġ"], ["▁"]),
                     (["ð", "Ł", "Ļ", "Ĥ"], ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]), (["!"], ["<0x21>"])]


def test_chat_templates_with_special_tokens_on_one_side_only(tokenizer, metaspace_tokenizer):
    messages = [{"role": "user", "content": "What does the bank report?"}, {"role": "assistant", "content": "Risk 中."}]
    texts = [tok.apply_chat_template(messages, tokenize=False) for tok in (tokenizer, metaspace_tokenizer)]
    assert texts[0].startswith("<|im_start|>user") and texts[1].startswith("<s><|user|>")
    sides = []
    for tok, text in zip((tokenizer, metaspace_tokenizer), texts):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ranges = token_ranges(enc.offset_mapping, text, [m["content"] for m in messages])
        sides.append((tok.convert_ids_to_tokens(enc.input_ids), ranges))
    spans = align(sides[0][1], sides[1][1])
    shown = [(sides[0][0][s.a[0]:s.a[1]], sides[1][0][s.b[0]:s.b[1]]) for s in spans]
    header = ["a", "ss", "i", "st", "an", "t"]
    assert shown == [
        (["<|im_start|>", "u", "s", "e", "r", "Ċ"],
         ["<s>", "<0x3C>", "<0x7C>", "u", "s", "e", "r", "<0x7C>", "<0x3E>", "<0x0A>"]),
        (["What"], ["Wh", "at"]), (["Ġdoes"], ["▁does"]), (["Ġthe"], ["▁the"]), (["Ġbank"], ["▁bank"]),
        (["Ġreport", "?"], ["▁report?"]),
        (["<|im_end|>", "Ċ", "<|im_start|>", *header, "Ċ"],
         ["</s>", "<0x0A>", "<0x3C>", "<0x7C>", *header, "<0x7C>", "<0x3E>", "<0x0A>"]),
        (["R"], ["<0x52>"]), (["isk"], ["isk"]), (["Ġ"], ["▁"]), (["ä", "¸", "Ń"], ["<0xE4>", "<0xB8>", "<0xAD>"]),
        (["."], ["."]), (["<|im_end|>", "Ċ"], ["</s>", "<0x0A>"])]
    # The end of the assistant header on both sides predicts the answer's first token.
    assert (21, 28) in boundary_pairs(spans)


def test_hand_written_ranges():
    # a: zero-width token inside b's word, a piece sharing its character's range; b: one side ends early
    a = [(0, 0), (0, 3), (3, 3), (3, 6), (6, 9), (6, 9), (9, 12)]
    b = [(0, 6), (6, 9), (9, 10)]
    assert align(a, b) == [Span((0, 1), (0, 0)), Span((1, 4), (0, 1)), Span((4, 6), (1, 2)), Span((6, 7), (2, 3))]
    assert boundary_pairs(align(a, b)) == [(3, 0), (5, 1), (6, 2)]
