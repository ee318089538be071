"""A real `scope-edge serve` process on 127.0.0.1 for client tests (as
tests/test_server.py starts it), with one OpenMP thread by default: on a
shared 2-core machine two-thread barriers stall behind other processes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
STARTUP = 300  # seconds to answer /health: loading takes seconds, but a shared machine can stall it for minutes


@dataclass
class Served:
    process: subprocess.Popen
    url: str
    model: str
    client: openai.OpenAI

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_free(self, slots: int, timeout: float = 20) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.health()["free_slots"] == slots:
                return True
            time.sleep(0.05)
        return False

    def rss(self) -> int:
        """The server process's resident memory, bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def start_server(model_path: str, *args: str) -> Served:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "scope_edge.cli", "serve", "--model", model_path, "--port", str(port),
           "--threads", "1", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "SCOPE_EDGE_API_KEY"})
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + STARTUP
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(f"the server did not answer /health within {STARTUP} s")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    return Served(proc, url, Path(model_path).name.removesuffix(".gguf"), client)
