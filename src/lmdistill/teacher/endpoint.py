"""A teacher served by an OpenAI-compatible inference server (vLLM's `api_server`), asked over HTTP.

The teacher-source seam: `cache-teacher` and `generate` take an `EndpointTeacher` where they would take a loaded
model; the stages of `run` ask it through served_scoring.ServedScorer. It asks `/v1/completions` with the prompt as
token ids (so the server sees exactly the ids we would feed in-process): `prompt_logprobs: k` (vLLM's extension,
bounded by the server's `--max-logprobs`) gives the top-k at every prompt position, `max_tokens` +
`return_token_ids` the generations.

Requests run `concurrency` at a time; a failed one (connection refused, 5xx, timeout) is retried with doubling
backoff, then the command stops with one line naming the server. Answers that cannot be what we asked for (not
JSON, fewer than k log-probs, ids outside the vocabulary) stop it at once: retrying would not change them. Every
file the commands write stays resumable, so a re-run after a server restart loses nothing.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from lmdistill.errors import LmdistillError

log = logging.getLogger(__name__)

# Text the tokenizer probe compares (words, digits, punctuation, spacing and a non-ASCII letter).
PROBE_TEXT = "The teacher's tokenizer: 12 apples, 3.5% growth; naïve résumé\n  next line."


class EndpointError(LmdistillError):
    """The teacher server is unreachable, refuses a request, or answers something unusable."""


class _Retryable(Exception):
    pass


class Endpoint:
    """HTTP to one OpenAI-compatible server: JSON in and out, retries with backoff, bounded concurrency."""

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 4, concurrency: int = 8,
                 backoff: float = 0.5):
        self.url, self.timeout, self.retries, self.concurrency, self.backoff = url.rstrip("/"), timeout, retries, \
            concurrency, backoff
        # vLLM serves /tokenize at the root, beside /v1.
        self.root = self.url[:-3] if self.url.endswith("/v1") else self.url

    def request(self, path: str, payload: dict | None = None, root: bool = False) -> dict:
        """POST `payload` (GET without one) to `path`; the decoded JSON answer."""
        url = (self.root if root else self.url) + path
        data = None if payload is None else json.dumps(payload).encode()
        tries = self.retries + 1
        for attempt in range(tries):
            try:
                return self._once(url, data)
            except _Retryable as err:
                if attempt + 1 == tries:
                    raise EndpointError(f"teacher server {self.url}: gave up after {tries} tries ({err}); check that it is "
                                        "running (re-run the same command to resume), or raise "
                                        "teacher.endpoint_retries / endpoint_timeout") from None
                wait = min(self.backoff * 2 ** attempt, 30.0)
                log.warning("teacher server %s: %s; retry %d of %d in %.1f s", self.url, err, attempt + 1,
                            self.retries, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _once(self, url: str, data: bytes | None) -> dict:
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300].replace("\n", " ")
            if err.code >= 500 or err.code == 429:
                raise _Retryable(f"HTTP {err.code} from {url}") from None
            raise EndpointError(f"teacher server {self.url} refused {url} (HTTP {err.code}): {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                raise _Retryable(f"no answer within {self.timeout:g} s") from None
            raise _Retryable(f"cannot reach {url}: {reason}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise EndpointError(f"teacher server {self.url} answered {url} with something that is not JSON "
                                f"({body[:80]!r}); is teacher.endpoint an OpenAI-compatible server (vLLM)?") from None

    def map(self, fn, items: list) -> list:
        """fn over items, `concurrency` requests in flight, results in order."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))


def _field(answer: dict, url: str, *path):
    """answer[path[0]][path[1]]...; a malformed answer is one clear error."""
    value = answer
    try:
        for key in path:
            value = value[key]
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"teacher server {url} answered without {'.'.join(map(str, path))} (a malformed "
                            f"response: {json.dumps(answer)[:160]}); is it vLLM's OpenAI-compatible server?") from None
    return value


class EndpointTeacher:
    """The teacher as a server: top-k log-probs of prompts, and generations, by token ids."""

    def __init__(self, endpoint: Endpoint, served_model: str, teacher_name: str, vocab_size: int, config=None):
        self.endpoint, self.served_model, self.teacher_name, self.vocab_size = endpoint, served_model, \
            teacher_name, vocab_size
        self.config = config  # the teacher's transformers config, read from teacher.name (what the cache records)

    @property
    def url(self) -> str:
        return self.endpoint.url

    def _complete(self, payload: dict) -> dict:
        return self.endpoint.request("/completions", {"model": self.served_model, **payload})

    # ---------------------------------------------------------------------------------------------- top-k
    def prompt_topk(self, ids: list[int], k: int) -> list[dict[int, float] | None]:
        """Per position of `ids`, the teacher's k most likely next-token ids given the ids before it, as
        {id: log-prob} (None at position 0, which nothing predicts)."""
        answer = self._complete({"prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k})
        positions = _field(answer, self.url, "choices", 0, "prompt_logprobs")
        if not isinstance(positions, list) or len(positions) != len(ids):
            raise EndpointError(f"teacher server {self.url} returned prompt log-probs for "
                                f"{len(positions) if isinstance(positions, list) else 'no'} of {len(ids)} prompt "
                                "tokens; is it vLLM (prompt_logprobs is its extension)?")
        out = [None]
        for entry in positions[1:]:
            try:
                ranked = sorted(((int(tok), float(v["logprob"]), int(v["rank"])) for tok, v in entry.items()),
                                key=lambda t: t[2])
            except (AttributeError, KeyError, TypeError, ValueError):
                raise EndpointError(f"teacher server {self.url} sent a malformed prompt log-prob entry "
                                    f"({json.dumps(entry)[:160]})") from None
            # vLLM adds the actual prompt token with its own rank when it is outside the top k.
            top = {tok: lp for tok, lp, rank in ranked if rank <= k}
            if len(top) < k:
                raise EndpointError(f"teacher server {self.url} returned {len(top)} log-probs per token, fewer than "
                                    f"k = {k}: start it with --max-logprobs {k} (or more), or lower teacher_cache.k "
                                    f"(--k on cache-teacher) to {len(top)}")
            out.append(dict(list(top.items())[:k]))
        return out

    def capture(self, examples: list[dict], k: int) -> list[tuple[torch.Tensor, ...]]:
        """Per example (causal layout, as capture.py counts tokens): (ids [n, k], log-probs [n, k] at temperature 1,
        most likely first, tail mass [n]) at its counted tokens, from concurrent requests."""
        def one(example: dict) -> tuple[torch.Tensor, ...]:
            top = self.prompt_topk(example["input_ids"], k)
            rows = [top[t + 1] for t, label in enumerate(example["labels"][1:]) if label != -100]
            ids = torch.tensor([list(row) for row in rows], dtype=torch.int64).reshape(len(rows), k)
            if len(ids) and int(ids.max()) >= self.vocab_size:
                raise EndpointError(f"teacher server {self.url} returned token id {int(ids.max())}, outside the "
                                    f"{self.vocab_size}-id vocabulary of teacher {self.teacher_name}: it serves "
                                    "another model")
            logprobs = torch.tensor([list(row.values()) for row in rows], dtype=torch.float32).reshape(len(rows), k)
            tail = (1 - logprobs.exp().sum(-1)).clamp_min(0) if k < self.vocab_size else torch.zeros(len(rows))
            return ids, logprobs, tail

        return self.endpoint.map(one, examples)

    # ---------------------------------------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], num_samples: int, max_new_tokens: int, sampling: dict,
                 seed: int) -> list[list[tuple[list[int], str]]]:
        """Per prompt, `num_samples` (generated ids, finish reason), from concurrent requests; `sampling`: the
        request's sampling fields (sampling.server_sampling)."""

        def one(prompt: list[int]) -> list[tuple[list[int], str]]:
            answer = self._complete({"prompt": prompt, "max_tokens": max_new_tokens, "n": num_samples, "seed": seed,
                                     "return_token_ids": True, **sampling})
            choices = sorted(_field(answer, self.url, "choices"), key=lambda c: c.get("index", 0))
            if len(choices) != num_samples:
                raise EndpointError(f"teacher server {self.url} returned {len(choices)} generations for a prompt, "
                                    f"not the {num_samples} asked for")
            return [(list(_field(c, self.url, "token_ids")), c.get("finish_reason") or "") for c in choices]

        return self.endpoint.map(one, prompts)


def served_models(endpoint: Endpoint) -> list[str]:
    return [str(_field(m, endpoint.url, "id")) for m in _field(endpoint.request("/models"), endpoint.url, "data")]


def open_teacher(settings, tokenizer, vocab_size: int, config=None) -> EndpointTeacher:
    """The server `settings.endpoint` (a TeacherSettings), checked before any work: it answers, and the model it
    serves splits text into the same ids as the teacher's tokenizer (`tokenizer`, loaded from settings.name)."""
    endpoint = Endpoint(settings.endpoint, timeout=settings.endpoint_timeout, retries=settings.endpoint_retries,
                        concurrency=settings.endpoint_concurrency)
    models = served_models(endpoint)
    if not models:
        raise EndpointError(f"teacher server {endpoint.url} serves no model; start it with --model {settings.name}")
    served = models[0]
    answer = endpoint.request("/tokenize", {"model": served, "prompt": PROBE_TEXT, "add_special_tokens": False},
                              root=True)
    theirs = _field(answer, endpoint.url, "tokens")
    ours = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if list(theirs) != list(ours):
        raise EndpointError(f"teacher server {endpoint.url} serves {served!r}, whose tokenizer splits text into other "
                            f"ids than teacher.name {settings.name!r}'s: serve that teacher (--model "
                            f"{settings.name}) or set teacher.name to the served model")
    limit = answer.get("max_model_len") if isinstance(answer, dict) else None
    log.info("teacher server %s serves %s (same tokenizer as %s%s)", endpoint.url, served, settings.name,
             f", max_model_len {limit}" if limit else "")
    return EndpointTeacher(endpoint, served, settings.name, vocab_size, config)
