"""Helpers for the server tests: a tiny model that has a real tokenizer, and `spdecode serve` as a
subprocess on a free local port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx2 as httpx  # the HTTP client the openai package is built on
import torch
from conftest import tiny_model


def tiny_chat_model(path):
    """A random tiny Llama with SmolLM2's tokenizer (and chat template) and a context long enough
    for long generations; it and its tokenizer live in `path`."""
    from transformers import AutoTokenizer

    from spdecode.runtime.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=4096)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`spdecode serve ARGS` on a free port; waits until /health answers."""

    def __init__(self, args: list[str], ready_s: float = 120, env: dict | None = None):
        """env: variables to set for the server (a value None unsets one); OMP_NUM_THREADS is 1 unless given."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        env = {k: v for k, v in env.items() if v is not None}
        self.proc = subprocess.Popen([sys.executable, "-m", "spdecode", "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        deadline = time.time() + ready_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.communicate()[1][-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("the server did not come up")

    def client(self, timeout: float = 120):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)

    def processes(self) -> list[int]:
        """The server process and its live descendants (torchrun and its ranks, which it starts in
        sessions of their own)."""
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,stat="], capture_output=True, text=True).stdout
        rows = [line.split() for line in out.splitlines()]
        found, frontier = [], [self.proc.pid]
        while frontier:
            pid = frontier.pop()
            found.append(pid)
            frontier += [int(p) for p, pp, _ in rows if int(pp) == pid]
        live = {int(p) for p, _, st in rows if not st.startswith("Z")}
        return [p for p in found if p in live]


    def stop(self, sig=15, timeout: float = 30) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            _, err = self.proc.communicate()
            raise AssertionError(f"the server did not stop within {timeout} s: {err[-2000:]}") from None
        return self.proc.returncode, err


def greedy_text(model, tok, ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    """(text, completion tokens, finish_reason) of plain AR in fp32: what every method must answer."""
    from spdecode.methods.ar import generate_ar
    from spdecode.runtime.generation import eos_ids
    from spdecode.runtime.staged import StagedTarget

    with torch.inference_mode():
        gen = generate_ar(StagedTarget(model), ids, max_tokens, eos=eos_ids(model, tok))
    finish = "stop" if gen.metrics.stop_reason == "eos" else gen.metrics.stop_reason
    return tok.decode(gen.tokens, skip_special_tokens=True), len(gen.tokens), finish


def alive(pids: list[int], within: float = 10.0) -> list[int]:
    """Those of `pids` that still run (not gone, not zombies) `within` seconds after the call: a
    server's helpers (multiprocessing's resource tracker, a rank) see their parent's exit as an EOF
    and end a moment after it, so "left running" means still there once that moment has passed."""
    deadline = time.time() + within
    while True:
        out = []
        for pid in pids:
            try:
                if open(f"/proc/{pid}/stat").read().split()[2] != "Z":
                    out.append(pid)
            except OSError:
                pass
        if not out or time.time() > deadline:
            return out
        time.sleep(0.1)
