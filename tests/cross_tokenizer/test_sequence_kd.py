"""Sequence-level KD across tokenizers: the teacher answers prompts rendered with its own tokenizer and chat
template, and the student trains on the answer text rendered with its template."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.config import config_from_dict
from lmdistill.data.cache import tokenizer_hash
from lmdistill.errors import ModelError
from lmdistill.train.teacher_commands import generate
from lmdistill.teacher.generate import load_generations
from lmdistill.train.prepare import prepare

CE_ONLY = [{"name": "non_policy", "kind": "non_policy", "max_steps": 2, "losses": [{"name": "cross_entropy"}]}]


def test_teacher_is_prompted_with_its_own_template_and_the_student_trains_on_its_own(
        cross_config, metaspace_tokenizer, tokenizer):
    # generate writes text, so it runs whatever the stages' losses (this one would need a shared vocabulary)
    config = config_from_dict(cross_config([{"name": "kd", "max_steps": 1, "losses": [{"name": "forward_kl"}]}]))
    path, written = generate(config)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == len(lines) == 8
    for line in lines:
        assert line["tokenizer"] == tokenizer_hash(metaspace_tokenizer)
        question = line["messages"][0]["content"]
        # the teacher's template (BOS, Zephyr-style markers), rendered from the row's messages; the text leaves out
        # the BOS its tokenizer puts in front of any text by itself
        assert metaspace_tokenizer.decode(line["prompt_ids"]) == f"<s><|user|>\n{question}</s>\n<|assistant|>\n"
        assert line["prompt"] == f"<|user|>\n{question}</s>\n<|assistant|>\n"
        assert line["text"] == line["prompt"] + line["completion"]
    examples = load_generations(path, tokenizer_hash(tokenizer), 48, "causal", tokenizer=tokenizer)
    assert len(examples) == 8
    first, line = examples[0], lines[0]
    prompt = tokenizer.decode(first["input_ids"][: first["prompt_length"]])
    assert prompt == f"<|im_start|>user\n{line['messages'][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    answer = [t for t in first["labels"] if t != -100]
    assert tokenizer.decode(answer) == f"{line['completion']}<|im_end|>{tokenizer.eos_token}"


def test_the_teachers_answer_is_the_students_message_without_its_word_start_marker(
        cross_config, metaspace_tokenizer, tokenizer, monkeypatch):
    """Each turn is tokenised on its own, so the metaspace teacher's answers start with a word-start marker ('▁')
    that stands for no character of the answer. A teacher that answers each prompt with the very tokens it trains
    on for the reference answer writes that answer, with no leading space, and the student trains on exactly its
    own tokens of the reference conversation."""
    from transformers import LlamaForCausalLM

    from lmdistill.data.tokenize import encode_rows
    from lmdistill.teacher.retokenize import teacher_sources

    config = config_from_dict(cross_config(CE_ONLY))
    reference = teacher_sources(config, metaspace_tokenizer, "causal", ["domain"])["domain"]
    # by prompt (rows that ask the same question get one of their answers)
    answers = {tuple(ex["input_ids"][:ex["prompt_length"]]): (ex["input_ids"][ex["prompt_length"]:], ex["answer"])
               for ex in reference}
    assert all(metaspace_tokenizer.convert_ids_to_tokens(ids[0]).startswith("▁") for ids, _ in answers.values())

    def answer(self, input_ids, attention_mask, **kwargs):
        rows = [answers[tuple(ids[mask.bool()].tolist())][0] for ids, mask in zip(input_ids, attention_mask)]
        width = max(map(len, rows))
        pad = metaspace_tokenizer.pad_token_id
        return torch.tensor([ids.tolist() + row + [pad] * (width - len(row)) for ids, row in zip(input_ids, rows)])

    monkeypatch.setattr(LlamaForCausalLM, "generate", answer)
    path, _ = generate(config)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    written = [answers[tuple(line["prompt_ids"])][1] for line in lines]
    assert [line["completion"] for line in lines] == written and not any(text[0].isspace() for text in written)
    examples = load_generations(path, tokenizer_hash(tokenizer), 48, "causal", tokenizer=tokenizer)
    rows = [{"messages": line["messages"] + [{"role": "assistant", "content": text}], "row_id": number}
            for number, (line, text) in enumerate(zip(lines, written))]
    expected = encode_rows(rows, tokenizer, max_length=48, task_type="causal", source_name="reference").examples
    assert [(ex["input_ids"], ex["labels"]) for ex in examples] == [(ex["input_ids"], ex["labels"]) for ex in expected]


def test_lmdistill_run_distils_across_tokenizers_on_the_teachers_text(cross_config, tmp_path):
    config = cross_config(CE_ONLY, evaluation={"enabled": True, "num_samples": 1, "max_prompts": 2,
                                               "measure_speed": False, "report": False})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "config.yaml")])
    assert result.exit_code == 0, result.output[-3000:]
    run = Path(config["output_dir"])
    assert (run / "final" / "config.json").exists()
    assert len((tmp_path / "generations.jsonl").read_text().splitlines()) == 8
    metrics = json.loads((run / "metrics.json").read_text())
    assert "student_after" in metrics and "teacher" not in metrics  # the teacher cannot read the student's ids


def test_logit_loss_across_tokenizers_names_the_paths_that_work(cross_config):
    config = config_from_dict(cross_config([{"name": "kd", "max_steps": 1, "losses": [{"name": "forward_kl"}]}]))
    with pytest.raises(ModelError) as err:
        prepare(config)
    message = str(err.value)
    assert "tokenizers differ" in message and "stage 'kd''s loss forward_kl compares token ids" in message
    assert "kind: non_policy" in message and "losses: [{name: cross_entropy}]" in message
    assert "[{name: uld}]" in message and "[{name: cross_vocab_kl}]" in message
    assert "\n" not in message
