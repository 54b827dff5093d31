"""`spdecode serve --distributed`: the same rank processes serve every request (SPD over trees on
torch.distributed, gloo), stay up while idle past the process group's timeout, answer exactly
what AR answers, survive a client leaving mid-stream, end with a clear error and a non-zero exit
when a rank dies, and leave no process behind on SIGTERM."""

from __future__ import annotations

import os
import signal
import time

import httpx2 as httpx  # the HTTP client the openai package is built on
import openai
import pytest
from serving import Server, alive, greedy_text, tiny_chat_model

from spdecode.runtime.prompts import template_ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-dist") / "model"
    model, tok = tiny_chat_model(path)
    return str(path), model, tok


def ranks(server: Server) -> list[int]:
    """pids of the rank processes (those with RANK in their environment)."""
    out = []
    for pid in server.processes():
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(b"RANK=") for e in env):
            out.append((int(next(e for e in env if e.startswith(b"RANK="))[5:]), pid))
    return [pid for _, pid in sorted(out)]


def start(path):
    return Server(["--model", path, "--method", "spd", "--distributed", "--stages", "2", "--tree-budget", "4",
                   "--tree-depth", "2", "--tree-topk", "2", "--timeout", "4"], ready_s=180)


def ask(server, path, text, **kw):
    return server.client().chat.completions.create(model=path, messages=[{"role": "user", "content": text}],
                                                   temperature=0, **kw)


def test_a_warm_pipeline_serves_exact_answers_and_stops_cleanly(tiny):
    path, model, tok = tiny
    s = start(path)
    try:
        first = ranks(s)
        assert len(first) == 2
        for text in ("Tell me a story.", "What is two plus two?"):
            ids = template_ids(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
            want, n, finish = greedy_text(model, tok, ids, 40)
            r = ask(s, path, text, max_tokens=40)
            assert (r.choices[0].message.content, r.usage.completion_tokens, r.choices[0].finish_reason) == \
                (want, n, finish)
        # Probes: for two rank timeouts (4 s), a request a second that fits the context but not the
        # pipeline's drafts in flight (such requests used to reach the engine, fail before any
        # message and starve the heartbeat until the ranks timed out and the server died); a 20 MB
        # body; 16 stop strings of 100k characters. Each gets its 4xx at once; the pipeline serves on.
        usable = 4096 - 2 * (4 + 1)
        t0 = time.time()
        while time.time() - t0 < 2 * 4:
            r = httpx.post(s.url + "/v1/completions", json={"model": path, "prompt": [5] * (usable - 4),
                                                            "max_tokens": 8}, timeout=10)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
            time.sleep(1)
        huge = {"model": path, "messages": [{"role": "user", "content": "x" * (20 << 20)}]}
        assert httpx.post(s.url + "/v1/chat/completions", json=huge, timeout=30).status_code == 413
        stops = {"model": path, "messages": [{"role": "user", "content": "Hi"}], "stop": ["y" * 100_000] * 16}
        assert httpx.post(s.url + "/v1/chat/completions", json=stops, timeout=30).status_code == 400
        # A client that leaves mid-stream, then idle longer than the ranks' 4 s timeout.
        body = {"model": path, "prompt": "A long tale", "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        time.sleep(6)
        ids = template_ids(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        want, _, _ = greedy_text(model, tok, ids, 30)
        streamed = "".join(c.choices[0].delta.content or "" for c in s.client().chat.completions.create(
            model=path, messages=[{"role": "user", "content": "Hi"}], max_tokens=30, temperature=0, stream=True))
        assert streamed == want
        assert ranks(s) == first  # the same processes served every request
    finally:
        pids = s.processes()
        code, err = s.stop(signal.SIGTERM, timeout=30)
    assert code == 0, err[-2000:]
    time.sleep(0.5)
    assert len(pids) >= 4 and not alive(pids)  # launcher, torchrun, two ranks


def test_a_dead_rank_fails_the_request_and_ends_the_server(tiny):
    path, _, _ = tiny
    s = start(path)
    try:
        assert ask(s, path, "Hello", max_tokens=5).choices[0].message.content is not None
        pids = s.processes()
        os.kill(ranks(s)[1], signal.SIGKILL)
        t0 = time.time()
        try:
            ask(s, path, "Hello again", max_tokens=50)
            raise AssertionError("a request succeeded with a dead rank")
        except (openai.APIStatusError, openai.APIConnectionError) as exc:
            if isinstance(exc, openai.APIStatusError):
                assert exc.status_code in (500, 503)
        _, err = s.proc.communicate(timeout=60)  # the server ends by itself
        code = s.proc.returncode
    finally:
        if s.proc.poll() is None:
            s.stop(signal.SIGKILL)
    assert time.time() - t0 < 60
    assert code != 0
    assert "error: rank 1" in err or "pipeline failed" in err, err[-2000:]
    time.sleep(0.5)
    assert not alive(pids)
