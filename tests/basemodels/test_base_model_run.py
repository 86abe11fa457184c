"""A base-model run (GPT-2-style tokenizer, no chat template) through the CLI: generate -> distill -> eval -> report.
Prompts continue the texts verbatim, generated texts keep their boundary, eos only where the teacher stopped, and
samples and ROUGE-L use continuations of held-out text prefixes."""

import json
import math

import pytest
import torch
import yaml
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from lmdistill.cli import app
from lmdistill.data.formats import load_source
from lmdistill.data.tokenize import encode_rows
from lmdistill.teacher import generations as commands

# eos against the other ids (at logit ~0) that transformers samples from (its default top_k: 50): the teacher stops
# at about 1 step in 6
EOS_LOGIT = math.log(0.2 * 50)


def _gpt2(tokenizer, path, layers, width, seed):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=width, n_layer=layers, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config), path


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_models(tmp_path_factory, base_tokenizer_dir):
    """(teacher, student) folders: tiny GPT-2 models. The teacher's final layer norm gets a constant unit and eos a
    weight on it, so some of its generations end by themselves and others are cut at max_new_tokens."""
    tok = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    teacher, _ = _gpt2(tok, None, 2, 64, seed=1)
    with torch.no_grad():
        teacher.transformer.ln_f.weight[0], teacher.transformer.ln_f.bias[0] = 0.0, 1.0
        teacher.transformer.wte.weight[:, 0] = 0.0
        teacher.transformer.wte.weight[tok.eos_token_id, 0] = EOS_LOGIT
    student, _ = _gpt2(tok, None, 1, 32, seed=2)
    return (_save(teacher, tok, tmp_path_factory.mktemp("base_teacher")),
            _save(student, tok, tmp_path_factory.mktemp("base_student")))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(path, teacher, student, sources, heldout, out):
    path.write_text(yaml.safe_dump({
        "teacher": {"name": str(teacher)}, "student": {"name": str(student)},
        "data": {"max_length": 48, "sources": sources, "eval": {"heldout": {"path": str(heldout)}}},
        "generation": {"max_new_tokens": 6, "batch_size": 4},
        "training": {"batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "report_to": []},
        "evaluation": {"num_samples": 2, "max_prompts": 4, "measure_speed": False},
        "stages": [{"name": "kd", "max_steps": 2, "losses": [{"name": "forward_kl"}]}],
        "output_dir": str(out)}))
    return path


def _cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def test_base_model_generate_distill_eval_report(tmp_path, base_models, base_tokenizer_dir, corpus, monkeypatch):
    teacher, student = base_models
    tok = AutoTokenizer.from_pretrained(base_tokenizer_dir)
    eos = tok.eos_token_id
    texts, heldout_texts = corpus[:12], corpus[-4:]
    corpus = _jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    heldout = _jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in heldout_texts])
    prompts = ["The bank reports", "A trader expects"]
    prompt_file = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompts[0]}, {"prompt": prompts[1], "completion": ""}])

    # generate: each text's first half is the prompt the teacher continues; prompts alone are continued as they are
    gen_config = _config(tmp_path / "gen.yaml", teacher, student, {"general": {"path": str(corpus)},
                                                                   "prompts": {"path": str(prompt_file)}},
                         heldout, tmp_path / "gen_run")
    generations = tmp_path / "generations.jsonl"
    said = []  # the CLI's log handler writes to the terminal: read what generate says from its logger
    monkeypatch.setattr(commands.log, "info", lambda message, *args: said.append(message % args))
    _cli("generate", gen_config, "--out", generations)
    assert ("generate: 12 rows of source general are plain text; the teacher continues each from the first 50% of its "
            "tokens (generation.text_prompt_fraction / text_prompt_tokens)") in said
    lines = [json.loads(line) for line in generations.read_text().splitlines()]
    assert len(lines) == len(texts) + len(prompts)
    for line in lines:
        if line["source"] == "prompts":
            assert line["prompt"] == prompts[line["row_id"]] and line["prompt_ids"] == tok(line["prompt"])["input_ids"]
        else:
            text_ids = tok(texts[line["row_id"]])["input_ids"]
            assert line["prompt_ids"] == text_ids[:round(len(text_ids) / 2)]  # verbatim, no BOS, no template
            assert texts[line["row_id"]].startswith(line["prompt"])
        stopped = line["completion_ids"][-1:] == [eos]
        assert line["finished"] == stopped
        # the boundary: prompt + completion is the text the ids decode to, leading spaces kept
        assert line["text"] == line["prompt"] + line["completion"]
        assert line["text"] == tok.decode(line["prompt_ids"] + line["completion_ids"][:len(line["completion_ids"])
                                                                                       - stopped])
    assert {line["finished"] for line in lines} == {True, False}
    assert any(line["completion"].startswith(" ") for line in lines)

    # the generations file is the student's data as it is: eos only after the generations that finished
    examples = encode_rows(load_source(generations).rows, tok, max_length=48, source_name="generated").examples
    for example, line in zip(examples, lines):
        assert tok.decode(example["input_ids"]) == line["text"] + ("<|endoftext|>" if line["finished"] else "")
        assert (example["input_ids"][-1] == eos) == line["finished"]

    # distill on it, evaluate on held-out texts, report
    run_config = _config(tmp_path / "run.yaml", teacher, student, {"generated": {"path": str(generations)}}, heldout,
                         tmp_path / "run")
    _cli("run", run_config)
    run = tmp_path / "run"
    _cli("eval", run)
    metrics = json.loads((run / "metrics.json").read_text())
    for role in ("teacher", "student_before", "student_after"):
        assert "rouge_l_continuation" in metrics[role] and "rouge_l" not in metrics[role], role
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["mode"] == "continuation" for s in samples)
    assert all(any(t.startswith(s["prompt"]) and s["prompt"] != t for t in heldout_texts) for s in samples)
    _cli("report", run)
    page = (run / "report.html").read_text()
    assert "prompts: continuations of held-out text prefixes" in page
    assert "rouge_l_continuation<small> greedy continuations of the first part of each held-out text" in page


def test_eval_of_a_model_folder_on_text_scores_held_out_continuations(tmp_path, base_models, corpus):
    from lmdistill.train.eval_command import evaluate_target

    _, student = base_models
    data = _jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in corpus[-3:]])
    result = evaluate_target(str(student), None, [str(data)], max_length=48, max_new_tokens=4)
    metrics = result.metrics
    assert result.written is None and 0.0 <= metrics["model"]["rouge_l_continuation"] <= 1.0
    assert "rouge_l" not in metrics["model"]
