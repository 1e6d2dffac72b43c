"""llama.cpp's own OpenAI-compatible server (`llama-server`, built by `make llama-server` into the
virtual environment) serving a GGUF model on 127.0.0.1: a server we did not write.

    with LlamaServer(gguf) as server:
        server.base_url          # http://127.0.0.1:<port>/v1
        server.stop(); server.start()   # same port: a server that went away and came back
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests
from services import free_port

BINARY = Path(sys.executable).parent / "llama-server"
ALIAS = "embedded"  # the model name it answers to (it serves its one model whatever a request names)


class LlamaServer:
    def __init__(self, gguf: Path, ctx_size: int = 4096):
        if not BINARY.exists():
            raise FileNotFoundError(f"{BINARY} is missing: `make llama-server` builds it (make test does)")
        self.gguf, self.ctx_size, self.port = gguf, ctx_size, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 120.0) -> LlamaServer:
        """Start it and wait until /health says the model is loaded (503 until then)."""
        self.process = subprocess.Popen(
            [BINARY, "-m", self.gguf, "--host", "127.0.0.1", "--port", str(self.port), "--ctx-size",
             str(self.ctx_size), "--alias", ALIAS, "--threads", "2"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}: {self.process.stderr.read()[-2000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"llama-server did not answer /health within {timeout_s:g} s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process.stderr.close()
            self.process = None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
