"""Logit KD across tokenizers: the teacher runs on its own tokens, the losses meet at aligned positions."""

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.config import config_from_dict
from lmdistill.train.cross_tokenizer import example_pairs
from lmdistill.teacher.retokenize import teacher_sources
from lmdistill.train.prepare import prepare


def test_pairs_follow_the_students_label_mask(cross_config, tokenizer, metaspace_tokenizer):
    config = config_from_dict(cross_config([{"name": "x", "max_steps": 1, "losses": [{"name": "uld"}]}]))
    prep = prepare(config)
    assert prep.teacher_tokenizer is not None and prep.shared_vocab is None
    student = prep.sources["domain"][0]
    teacher = teacher_sources(config, metaspace_tokenizer, "causal", ["domain"])["domain"][0]
    messages = teacher["messages"] + [{"role": "assistant", "content": teacher["answer"]}]
    pairs = example_pairs(student, teacher, messages, tokenizer, metaspace_tokenizer)
    s_text = [tokenizer.decode(student["input_ids"][: s + 1]) for s, _ in pairs]
    t_text = [metaspace_tokenizer.decode(teacher["input_ids"][: t + 1]) for _, t in pairs]
    answer = teacher["answer"]
    # the first pair: both prompts end with their assistant header and predict the answer's first token
    assert s_text[0].endswith("<|im_start|>assistant\n") and t_text[0].endswith("<|assistant|>\n")
    # then both sides have read the same prefix of the answer at every pair (the metaspace side decodes the
    # answer's first word with the space its "▁" marks, as the response is tokenised on its own)
    for s, t in zip(s_text[1:], t_text[1:]):
        s_answer, t_answer = s.split("assistant\n")[-1], t.split("<|assistant|>\n")[-1].lstrip(" ")
        assert s_answer == t_answer and answer.startswith(s_answer)
    # every pair's next student token is trained on; the last one predicts the end of the turn
    assert all(student["labels"][s + 1] != -100 for s, _ in pairs)
    assert s_text[-1].endswith(answer)


def test_uld_and_cross_vocab_kl_train_through_lmdistill_run_and_fall(cross_config, tmp_path):
    for term, lr, losses in (("uld", 2e-2, [{"name": "uld"}]),
                             ("cross_vocab_kl", 5e-3, [{"name": "cross_vocab_kl"}, {"name": "cross_entropy"}])):
        config = cross_config([{"name": "s", "max_steps": 8, "learning_rate": lr, "losses": losses}],
                              training={"batch_size": 8, "logging_steps": 1, "report_to": [],
                                        "lr_scheduler_type": "constant"}, output_dir=str(tmp_path / term))
        (tmp_path / f"{term}.yaml").write_text(yaml.safe_dump(config))
        result = CliRunner().invoke(app, ["run", str(tmp_path / f"{term}.yaml")])
        assert result.exit_code == 0, result.output[-3000:]
        history = json.loads((Path(config["output_dir"]) / "s" / "log_history.json").read_text())
        values = [h[f"loss/{term}"] for h in history if f"loss/{term}" in h]
        assert len(values) == 8 and sum(values[-3:]) < 0.8 * sum(values[:3]), values


def test_teacher_terms_equal_the_losses_on_its_full_logits(metaspace_teacher_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from lmdistill.losses.cross_vocab import cross_vocab_kl, uld
    from lmdistill.train.cross_tokenizer import CrossVocabTeacher

    teacher = AutoModelForCausalLM.from_pretrained(metaspace_teacher_dir).eval()
    g = torch.Generator().manual_seed(0)
    inputs = {"teacher_input_ids": torch.randint(0, 300, (2, 7), generator=g),
              "teacher_attention_mask": torch.ones(2, 7, dtype=torch.long),
              "pairs": torch.tensor([[[0, 1], [2, 4], [3, 6]], [[1, 0], [-1, -1], [-1, -1]]])}
    student_logits = torch.randn(2, 5, 40, generator=g)
    shared = (torch.tensor([0, 3, 5]), torch.tensor([2, 7, 9]))
    source = CrossVocabTeacher(teacher, {"uld": 1.0, "cross_vocab_kl": 0.5}, 2.0, shared)
    got = source.terms(student_logits, inputs, num_items=10)
    with torch.no_grad():
        full = teacher(input_ids=inputs["teacher_input_ids"]).logits
    s_rows = torch.stack([student_logits[0, 0], student_logits[0, 2], student_logits[0, 3], student_logits[1, 1]])
    t_rows = torch.stack([full[0, 1], full[0, 4], full[0, 6], full[1, 0]])
    assert torch.allclose(got["uld"], uld(s_rows, t_rows, 2.0) / 10, atol=1e-6)
    assert torch.allclose(got["cross_vocab_kl"], cross_vocab_kl(s_rows, t_rows, *shared, temperature=2.0) / 10,
                          atol=1e-6)


def test_cross_vocabulary_losses_name_the_stage_settings_they_need(cross_config):
    import pytest

    from lmdistill.errors import ConfigError

    cases = [({"kind": "non_policy"}, "uld reads the teacher on its own tokens beside the student: it needs kind: "
                                      "distill, teacher_source: live or cache, and fused: false"),
             ({"teacher_source": "generations"}, "teacher_source: live or cache"),
             ({"fused": True}, "fused: false"),
             ({"losses": [{"name": "uld"}, {"name": "feature"}]}, "uld goes with logit losses only")]
    for extra, message in cases:
        stage = {"name": "x", "max_steps": 1, "losses": [{"name": "uld"}], **extra}
        with pytest.raises(ConfigError, match=message):
            config_from_dict(cross_config([stage]))


def test_eval_rows_held_out_of_a_source_get_the_teachers_view(cross_config, metaspace_tokenizer):
    from lmdistill.train.cross_tokenizer import teacher_views

    data = cross_config([])["data"]
    config = config_from_dict(cross_config([{"name": "x", "max_steps": 1, "losses": [{"name": "uld"}]}],
                                           data={**data, "eval": {}, "eval_holdout": 0.25}))
    prep = prepare(config, load_teacher=False)
    assert list(prep.eval_sets) == ["domain"] and prep.eval_sets["domain"]  # held out: data.eval is empty
    _, evals = teacher_views(config, prep, metaspace_tokenizer, prep.sources, "test")
    assert [ex["row_id"] for ex in evals["domain"]] == [ex["row_id"] for ex in prep.eval_sets["domain"]]
    assert all(ex["pairs"] for ex in evals["domain"])
