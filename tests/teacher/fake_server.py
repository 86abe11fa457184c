"""A stand-in for vLLM's OpenAI-compatible server, backed by a tiny transformers model in this process.

It answers what the endpoint client asks (/v1/models, /tokenize, /v1/completions with prompt_logprobs or
max_tokens + return_token_ids) as vLLM does, from the model's own logits, and misbehaves on purpose when told
(`faults`): HTTP 500 for the next N completions, a body that is not JSON, fewer log-probs than asked, answers slower
than the client's timeout, another tokenizer, going down (connections dropped unanswered) after N completions."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class FakeServer:
    def __init__(self, model, tokenizer, name: str = "fake-teacher"):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.faults = {"errors": 0, "malformed": False, "fewer": False, "delay": 0.0, "other_tokenizer": False,
                       "down_after": None}
        self.requests = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        # Closing waits for answers still in flight (a delayed one): a handler thread still running the model while
        # the interpreter exits aborts it ("terminate called without an active exception").
        self.httpd.daemon_threads = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------------------------------------ answers
    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        with self.lock:  # one forward at a time: the model is shared by the handler threads
            logits = self.model(input_ids=torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    def _prompt_logprobs(self, ids: list[int], k: int) -> list:
        logprobs = self._logprobs(ids)
        out = [None]
        for t in range(1, len(ids)):
            row = logprobs[t - 1]
            top = row.topk(k - 1 if self.faults["fewer"] else k)
            entry = {str(i): {"logprob": float(v), "rank": r + 1, "decoded_token": ""}
                     for r, (v, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()))}
            actual = ids[t]
            if str(actual) not in entry:  # as vLLM: the prompt token too, with its own rank
                entry[str(actual)] = {"logprob": float(row[actual]), "rank": int((row > row[actual]).sum()) + 1,
                                      "decoded_token": ""}
            out.append(entry)
        return out

    def _generate(self, ids: list[int], max_tokens: int, n: int) -> list[dict]:
        with self.lock, torch.no_grad():
            generated = self.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_tokens,
                                            do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                                            eos_token_id=self.tokenizer.eos_token_id)
        new = generated[0, len(ids):].tolist()
        eos = self.tokenizer.eos_token_id
        new = new[: new.index(eos) + 1] if eos in new else new
        return [{"index": i, "text": "", "token_ids": new, "finish_reason": "stop" if eos in new else "length"}
                for i in range(n)]

    def answer(self, path: str, body: dict | None):
        if path == "/v1/models":
            return {"object": "list", "data": [{"id": self.name, "object": "model"}]}
        if path == "/tokenize":
            ids = self.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
            if self.faults["other_tokenizer"]:
                ids = [i + 1 for i in ids]
            return {"tokens": ids, "count": len(ids), "max_model_len": 256}
        if path == "/v1/completions":
            if body.get("prompt_logprobs"):
                choice = {"index": 0, "text": "", "prompt_logprobs": self._prompt_logprobs(body["prompt"],
                                                                                           body["prompt_logprobs"])}
                return {"id": "cmpl", "choices": [choice]}
            return {"id": "cmpl", "choices": self._generate(body["prompt"], body["max_tokens"], body.get("n", 1))}
        return None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, payload: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _serve(self, body):
                completion = self.path == "/v1/completions"
                if completion:
                    server.requests += 1
                    down_after = server.faults["down_after"]
                    if down_after is not None and server.requests > down_after:
                        self.close_connection = True  # as a crashed server: the request is never answered
                        return
                    if server.faults["errors"] > 0:
                        server.faults["errors"] -= 1
                        return self._reply(500, b'{"error": "engine restarting"}')
                    if server.faults["malformed"]:
                        return self._reply(200, b"<html>gateway</html>")
                    time.sleep(server.faults["delay"])
                result = server.answer(self.path, body)
                if result is None:
                    return self._reply(404, b'{"detail": "Not Found"}')
                try:
                    self._reply(200, json.dumps(result).encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting (a timeout test)

            def do_GET(self):
                self._serve(None)

            def do_POST(self):
                self._serve(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        return Handler

