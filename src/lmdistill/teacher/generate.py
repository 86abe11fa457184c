"""`generate`: teacher responses for every prompt of the chosen sources, as resumable JSONL with provenance.

One line per (source, row, sample):
    {"prompt": str, "completion": str, "text": str, "prompt_ids": [int], "completion_ids": [int], "finished": bool,
     "source": str, "row_id": int, "sample": int, "teacher": str, "tokenizer": hash, "seed": int,
     "settings": {"temperature", "top_k", "top_p", "max_new_tokens", "do_sample"}, "thinking": bool | None}
A teacher on a server (endpoint.py) adds "served_by": {"endpoint", "model"}. `thinking` is the row's mode (see
thinking.py; None when generation.thinking_prob is unset), already applied to `prompt_ids`. `completion_ids` end with
eos when the teacher stopped by itself (`finished`). `text` is prompt + completion, without the ids the tokenizer
adds itself in front (BOS) or the completion's special tokens (its eos): a file the student can train on as it is.
The two are split at the exact boundary of the text decoded together (a leading space of the completion kept),
except in a line that keeps its conversation (`messages`, below): there the completion is the answer decoded on its
own, the assistant message's content for the student's template. Each turn is tokenised on its own, so a
SentencePiece-style teacher starts its answer with a word-start marker that decoding in context would turn into a
space the content does not have. Lines are appended and flushed per batch; a rerun keeps the rows whose samples are
all present (dropping a half-written last line or a row cut in the middle of its samples) and generates only the
rest, if its teacher and sampling settings are the file's (else it stops, naming what differs; a finished file made
with other settings is used as it is, with a warning).

A teacher whose tokenizer differs from the student's reads prompts rendered with its own tokenizer and chat template;
its lines also hold "messages" (the conversation without the answer), from which the student's examples are rendered
again with the student's template (see retokenize.py).

Several processes (torchrun) split the batches: batch i of the to-do list goes to process i mod W, so every batch,
and its sampling seed, is the one a single process would generate. The main process appends to the file itself,
process r > 0 to `.NAME.rank-R` beside it; after a barrier the main process appends the parts' complete rows and
deletes them (also at the start of a rerun, when a run died before that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from rich.progress import track

from lmdistill.config import GenerationSettings
from lmdistill.data.collate import DistillCollator
from lmdistill.data.completion import special_prefix
from lmdistill.data.tokenize import IGNORE_INDEX
from lmdistill.errors import DataError
from lmdistill.teacher.endpoint import EndpointTeacher
from lmdistill.teacher.ranks import ONE_PROCESS, Processes, my_share
from lmdistill.teacher.retokenize import student_examples
from lmdistill.teacher.sampling import generate_kwargs, recorded, samples_per_prompt, server_sampling
from lmdistill.teacher.thinking import ThinkingModes

log = logging.getLogger(__name__)


def _read_complete(path: Path, num_samples: int) -> tuple[list[dict], set[tuple[str, int]]]:
    """Lines of rows with all their samples, and the (source, row_id) keys of those rows."""
    if not path.exists():
        return [], set()
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not text.endswith("\n"):
            break  # the last line was being written when a run died
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {len(lines) + 1} is not JSON; it is not a generations file written by "
                            "`lmdistill generate` (choose another --out)") from None
    samples: dict[tuple[str, int], int] = {}
    for line in lines:
        key = (line["source"], line["row_id"])
        samples[key] = samples.get(key, 0) + 1
    done = {key for key, n in samples.items() if n >= num_samples}
    return [line for line in lines if (line["source"], line["row_id"]) in done], done


def _check_same_settings(path: Path, lines: list[dict], teacher_name: str, settings: dict, finished: bool) -> None:
    """Rows of another teacher or other sampling settings are never mixed into a file: finishing it with these stops
    (every process reads the same merged file, so all stop alike); a finished file is used as it is, with a warning."""
    ours = {"teacher": teacher_name, **settings}
    for line in lines:
        theirs = {"teacher": line.get("teacher"), **line.get("settings", {})}
        changed = ", ".join(f"{key} {theirs.get(key)} -> {value}" for key, value in ours.items()
                            if theirs.get(key) != value)
        if not changed:
            continue
        if not finished:
            raise DataError(f"{path} holds generations made with other settings ({changed}); delete it to generate "
                            "again with these, or write to another file (--out, generation.path)")
        log.warning("generations %s were made with other settings (%s) and are used as they are; delete the file to "
                    "generate them again with these", path, changed)
        return


def _rows_to_generate(sources: dict[str, list[dict]], done: set[tuple[str, int]],
                      task_type: str) -> list[tuple[str, dict]]:
    """(source, example) pairs that have a prompt and are not complete in the file yet."""
    return [(name, ex) for name, rows in sources.items() for ex in rows
            if (name, ex["row_id"]) not in done and (task_type == "seq2seq" or ex.get("prompt_length"))]


def missing_generations(out: str | Path, sources: dict[str, list[dict]], num_samples: int, task_type: str) -> int:
    """How many rows of `sources` the generations file `out` still lacks (rows in the per-process parts of a run
    that died before merging count as missing: a rerun of `generate` merges them)."""
    return len(_rows_to_generate(sources, _read_complete(Path(out), num_samples)[1], task_type))


def _rewrite(path: Path, lines: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)


def _part_path(out: Path, process_index: int) -> Path:
    """The file process `process_index` appends to (the main process, 0, writes the generations file itself)."""
    return out if process_index == 0 else out.with_name(f".{out.name}.rank-{process_index}")


def _merge_parts(out: Path, num_samples: int) -> None:
    """Main process: the file's complete rows, then the complete rows of the other processes' parts not already in
    it, each row once; the parts are deleted after the file is rewritten (a crash in between loses nothing)."""
    kept, done = _read_complete(out, num_samples)
    parts = sorted(out.parent.glob(f".{out.name}.rank-*"))
    added = []
    for part in parts:
        lines, keys = _read_complete(part, num_samples)
        added += [line for line in lines if (line["source"], line["row_id"]) not in done]
        done |= keys
    if added or (out.exists() and sum(1 for _ in out.open(encoding="utf-8")) != len(kept)):
        _rewrite(out, kept + added)  # also drops a partial tail, so every row appears once, whole
    for part in parts:
        part.unlink()


def _batch_seed(seed: int, source: str, row_id: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{source}:{row_id}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def _completion(ids: list[int], eos: int, pad: int) -> tuple[list[int], bool]:
    """Generated ids up to and including the first eos; (ids, finished)."""
    if eos in ids:
        return ids[: ids.index(eos) + 1], True
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids, False


def split_text(tokenizer, prompt_ids: list[int], completion_ids: list[int], chat: bool = False) -> tuple[str, str]:
    """(prompt, completion) text. A text row's continuation has the exact boundary: both decoded together and cut
    where the prompt's own text ends (decoding the continuation alone loses a leading space with some tokenizers). A
    chat answer (`chat`) is decoded alone: it was a turn tokenised alone, where such a tokenizer's leading word-start
    marker is no space of the content. The ids the tokenizer puts in front of a text by itself are left out of the
    prompt, so re-tokenising the text puts them back once."""
    lead = special_prefix(tokenizer)
    body = prompt_ids[len(lead):] if lead and prompt_ids[:len(lead)] == lead else prompt_ids
    prompt = tokenizer.decode(body)
    if not chat and (full := tokenizer.decode(body + completion_ids)).startswith(prompt):
        return prompt, full[len(prompt):]
    return prompt, tokenizer.decode(completion_ids)


def generate_responses(model, tokenizer, sources: dict[str, list[dict]], out: str | Path, *, task_type: str,
                       settings: GenerationSettings, seed: int, teacher_name: str, tokenizer_id: str,
                       modes: ThinkingModes | None = None, processes: Processes = ONE_PROCESS) -> int:
    """Answer every prompt of `sources` (encoded examples) `settings.num_samples` times; returns the lines this
    process wrote now. With `modes`, each row's prompt is put in its thinking or non-thinking mode first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if (samples := samples_per_prompt(settings)) < settings.num_samples:
        log.warning("generation.num_samples is %d, but do_sample is false: greedy decoding answers a prompt the same "
                    "way every time, so each gets one generation (set do_sample: true for several)",
                    settings.num_samples)
        settings = settings.model_copy(update={"num_samples": samples})
    _read_complete(out, settings.num_samples)  # every process: a foreign file fails on all of them alike
    if processes.is_main_process:
        _merge_parts(out, settings.num_samples)
    processes.wait_for_everyone()
    kept, done = _read_complete(out, settings.num_samples)
    collator = DistillCollator(tokenizer.pad_token_id, task_type=task_type)
    todo = _rows_to_generate(sources, done, task_type)
    _check_same_settings(out, kept, teacher_name, recorded(settings), finished=not todo)
    if done:
        log.info("generations %s: %d rows already written, %d to go", out, len(done), len(todo))
    sampling = recorded(settings)
    served = isinstance(model, EndpointTeacher)  # a teacher on a server: the batch's prompts go out concurrently
    device = None if served else next(model.parameters()).device
    special = set(tokenizer.all_special_ids)
    written = 0
    batches = my_share([todo[i:i + settings.batch_size] for i in range(0, len(todo), settings.batch_size)],
                       processes)
    with _part_path(out, processes.process_index).open("a", encoding="utf-8") as f:
        for batch in track(batches, description="teacher generating", disable=not batches, transient=True):
            thinking = [modes.is_thinking(f"{name}:{ex['row_id']}") if modes else None for name, ex in batch]
            if modes is not None:
                batch = [(name, {**ex, "input_ids": p, "prompt_length": len(p)}) for (name, ex), mode in
                         zip(batch, thinking) for p in [modes.apply(ex["input_ids"][: ex["prompt_length"]], mode)]]
            batch_seed = _batch_seed(seed, batch[0][0], batch[0][1]["row_id"])
            if served:
                answers = model.generate([ex["input_ids"][: ex["prompt_length"]] for _, ex in batch],
                                         settings.num_samples, settings.max_new_tokens,
                                         server_sampling(settings), batch_seed)
                new = [ids for samples in answers for ids, _ in samples]
            else:
                ids, mask = collator.collate_prompts([ex for _, ex in batch])
                torch.manual_seed(batch_seed)
                with torch.no_grad():
                    generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                               num_return_sequences=settings.num_samples,
                                               pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id, **generate_kwargs(settings))
                # causal: prompt then new tokens; seq2seq: decoder start token then new tokens
                new = (generated[:, ids.shape[1]:] if task_type == "causal" else generated[:, 1:]).tolist()
            for j, row in enumerate(new):
                name, ex = batch[j // settings.num_samples]
                prompt_ids = ex["input_ids"][: ex["prompt_length"]] if task_type == "causal" else ex["input_ids"]
                completion_ids, finished = _completion(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
                answer = [t for t in completion_ids if t not in special]  # as skip_special_tokens would
                prompt, completion = split_text(tokenizer, prompt_ids, answer, chat="messages" in ex) \
                    if task_type == "causal" else \
                    (tokenizer.decode(prompt_ids, skip_special_tokens=True), tokenizer.decode(answer))
                line = {"prompt": prompt, "completion": completion, "text": prompt + completion,
                        "prompt_ids": prompt_ids, "completion_ids": completion_ids, "finished": finished, "source": name,
                    "row_id": ex["row_id"], "sample": j % settings.num_samples, "teacher": teacher_name,
                    "tokenizer": tokenizer_id, "seed": batch_seed, "settings": sampling,
                    "thinking": thinking[j // settings.num_samples]}
                if served:
                    line["served_by"] = {"endpoint": model.url, "model": model.served_model}
                if "messages" in ex:  # the conversation, so another tokenizer's student can render it again
                    line["messages"] = ex["messages"]
                f.write(json.dumps(line) + "\n")
                written += 1
            f.flush()
            os.fsync(f.fileno())
    log.info("generations %s: %d new lines from process %d of %d (%d rows in all)", out, written,
             processes.process_index, processes.num_processes, len(done) + len(todo))
    processes.wait_for_everyone()
    if processes.is_main_process:
        _merge_parts(out, settings.num_samples)
        if modes is not None:
            thinking = [json.loads(t)["thinking"] for t in out.read_text(encoding="utf-8").splitlines()]
            log.info("generations %s: %d of %d lines in thinking mode (thinking_prob %s)", out,
                     sum(map(bool, thinking)), len(thinking), modes.prob)
    processes.wait_for_everyone()
    return written


def load_generations(path: str | Path, tokenizer_id: str, max_length: int, task_type: str,
                     tokenizer=None) -> list[dict]:
    """Training examples from a generations file: the teacher's completion is the target (labels), the prompt is
    masked. Lines written with this run's tokenizer (`tokenizer_id`) are used by their stored token ids; lines
    written by a teacher with another tokenizer, which keep their conversation, are rendered again from it and the
    completion text with `tokenizer`'s chat template. Rows longer than max_length are skipped."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no teacher generations at {path}; create them with `lmdistill generate CONFIG` or set "
                        "generation.path")
    examples, too_long, as_text = [], 0, []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = json.loads(text)
        if line.get("tokenizer") != tokenizer_id and "messages" in line and tokenizer is not None:
            as_text.append((number, line))
            continue
        if line.get("tokenizer") != tokenizer_id:
            raise DataError(f"{path}: line {number} was generated with another tokenizer than this run's; its token "
                            "ids would not match: run `lmdistill generate CONFIG --out NEW_FILE` again")
        prompt, completion = line["prompt_ids"], line["completion_ids"]
        if task_type == "causal":
            ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
            example = {"input_ids": ids, "labels": labels, "prompt_length": len(prompt)}
        else:
            ids, labels = prompt, completion
            example = {"input_ids": ids, "labels": labels}
        if len(ids) > max_length or len(labels) > max_length or not completion:
            too_long += 1
            continue
        examples.append({**example, "source": "generations", "row_id": number - 1, "bucket": line["source"]})
    if as_text:
        examples = sorted(examples + student_examples(as_text, tokenizer, max_length, task_type),
                          key=lambda ex: ex["row_id"])
    if too_long:
        log.warning("generations %s: skipped %d rows longer than max_length %d or empty", path, too_long, max_length)
    if not examples:
        raise DataError(f"{path} has no usable generations (empty, or every row longer than max_length {max_length})")
    return examples
