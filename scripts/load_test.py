"""Load and faults against `spdecode serve`: concurrent `openai` clients on loopback, every greedy
answer checked against plain AR in fp32 (what `spdecode generate --method ar --chat --dtype
float32` answers), and a report of what was served, how fast, what failed and how memory moved.

    python scripts/load_test.py --clients 32 --duration 300 --out load-eagle.json -- --method eagle --dtype float32
    python scripts/load_test.py --clients 32 --duration 300 -- --method spd --distributed --stages 2 --dtype float32
    python scripts/load_test.py --kill-rank 1 --kill-after 30 -- --method spd --distributed --stages 2 --dtype float32

Each client loops until the deadline: 80 % greedy chat requests (half streamed) whose text must
equal AR's; 10 % streams it leaves after two chunks; 10 % requests the server must refuse
(malformed JSON, a 5 MB body, an edge-of-context prompt, a bad parameter), each with the status it
must get. 429 (the bounded queue; one request decodes at a time) is expected under load. The
server's RSS (its whole process tree) is read after a warm-up that serves every prompt once, and
at the end; then SIGTERM, and every process of the tree must be gone. `--kill-rank R` instead
kills rank R mid-run: the server must exit non-zero within 10 s, naming the rank.

Targets (issue #26): no wrong answer; no 5xx but from a killed rank; RSS growth after warm-up at
most 10 %; no process left after SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the server tests' helpers
from serving import Server, alive  # noqa: E402

PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France? Answer in one sentence.",
    "Explain recursion to a child.",
    "List three uses of a paperclip.",
    "Why is the sky blue?",
    "Give me a tip for learning to cook.",
    "Describe a cat in two sentences.",
    "What does a compiler do?",
]
KINDS = ["greedy"] * 8 + ["disconnect", "refused"]  # 80 % / 10 % / 10 %
REFUSALS = ("malformed", "oversized", "edge_of_context", "bad_parameter")


def references(model_name: str, max_tokens: int) -> dict[str, tuple[str, str]]:
    """prompt -> (text, finish_reason) of plain AR in fp32 on the chat prompt."""
    import torch

    from spdecode.methods.ar import generate_ar
    from spdecode.runtime.generation import eos_ids
    from spdecode.runtime.models import load_model
    from spdecode.runtime.prompts import encode_prompt
    from spdecode.runtime.staged import StagedTarget

    model, tok = load_model(model_name, "float32", "cpu")
    target, eos, out = StagedTarget(model), eos_ids(model, tok), {}
    with torch.inference_mode():
        for p in PROMPTS:
            gen = generate_ar(target, encode_prompt(tok, p, True), max_tokens, eos=eos)
            finish = "stop" if gen.metrics.stop_reason == "eos" else gen.metrics.stop_reason
            out[p] = (tok.decode(gen.tokens, skip_special_tokens=True), finish)
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Load:
    """The clients' shared record: one row per request."""

    def __init__(self, server: Server, model: str, refs: dict, max_tokens: int, usable: int):
        self.server, self.model, self.refs, self.max_tokens, self.usable = server, model, refs, max_tokens, usable
        self.rows: list[dict] = []
        self.lock = threading.Lock()
        self.killed_at: float | None = None

    def record(self, **row):
        """Keep one request's row; returns its status."""
        row["t"] = time.time()
        with self.lock:
            self.rows.append(row)
        return row["status"]

    def greedy(self, client, rng: random.Random):
        prompt, stream = rng.choice(PROMPTS), rng.random() < 0.5
        t0, first = time.time(), None
        try:
            r = client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=self.max_tokens, temperature=0, stream=stream)
            if stream:
                parts, finish = [], None
                for c in r:
                    if c.choices and c.choices[0].delta.content:
                        first = first or time.time()
                        parts.append(c.choices[0].delta.content)
                    if c.choices and c.choices[0].finish_reason:
                        finish = c.choices[0].finish_reason
                text = "".join(parts)
            else:
                text, finish = r.choices[0].message.content, r.choices[0].finish_reason
            return self.record(kind="greedy", stream=stream, status=200, latency=time.time() - t0,
                        ttft=None if first is None else first - t0, right=(text, finish) == self.refs[prompt])
        except Exception as exc:  # noqa: BLE001 - every failure is counted by kind
            return self.record(kind="greedy", stream=stream, status=status_of(exc), latency=time.time() - t0,
                               error=str(exc))

    def disconnect(self, rng: random.Random):
        import httpx2 as httpx

        body = {"model": self.model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "max_tokens": 200, "temperature": 0, "stream": True}
        try:
            with httpx.stream("POST", self.server.url + "/v1/chat/completions", json=body, timeout=900) as r:
                status = r.status_code
                if status == 200:
                    lines = r.iter_lines()
                    for _ in range(2):
                        next(lines)
        except Exception as exc:  # noqa: BLE001
            status = status_of(exc)
        return self.record(kind="disconnect", status=status)

    def refused(self, rng: random.Random):
        import httpx2 as httpx

        what = rng.choice(REFUSALS)
        url, headers = self.server.url + "/v1/chat/completions", {"content-type": "application/json"}
        expected = {"malformed": 400, "oversized": 413, "edge_of_context": 400, "bad_parameter": 400}[what]
        if what == "malformed":
            content = b'{"model": "' + self.model.encode() + b'", "messages": [{"role": "user", "content": '
        elif what == "oversized":
            content = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "x" * (5 << 20)}]})
        elif what == "edge_of_context":  # fits the context, not with the method's drafts in flight
            url = self.server.url + "/v1/completions"
            content = json.dumps({"model": self.model, "prompt": [42] * (self.usable - 2), "max_tokens": 8})
        else:
            content = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "Hi"}],
                                  "temperature": 7})
        try:
            status = httpx.post(url, content=content, headers=headers, timeout=300).status_code
        except Exception as exc:  # noqa: BLE001
            status = status_of(exc)
        return self.record(kind=f"refused:{what}", status=status, expected=expected)


def status_of(exc: Exception) -> int | str:
    return getattr(exc, "status_code", None) or type(exc).__name__


def run_client(load: Load, index: int, deadline: float, seed: int) -> None:
    rng = random.Random(seed * 1000 + index)
    client = load.server.client(timeout=900)  # a full queue ahead of a request is minutes of waiting
    while time.time() < deadline:
        kind = rng.choice(KINDS)
        if kind == "greedy":
            status = load.greedy(client, rng)
        elif kind == "disconnect":
            status = load.disconnect(rng)
        else:
            status = load.refused(rng)
        if load.server.proc.poll() is not None:
            return
        if status == 429:  # as a client should: back off before trying again
            time.sleep(rng.uniform(0.5, 1.5))


def rank_pid(server: Server, rank: int) -> int:
    for pid in server.processes():
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise SystemExit(f"no process of rank {rank}: is the server --distributed?")


def summarize(load: Load, extra: dict) -> dict:
    rows = load.rows
    greedy = [r for r in rows if r["kind"] == "greedy" and r["status"] == 200]
    lat = sorted(r["latency"] for r in greedy)
    ttft = sorted(r["ttft"] for r in greedy if r.get("ttft") is not None)

    def pct(xs, q):
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], Counter())[str(r["status"])] += 1
    before_kill = [r for r in rows if load.killed_at is None or r["t"] < load.killed_at]
    unexpected = [r for r in before_kill if r["kind"].startswith("refused") and r["status"] != r["expected"]]
    five = [r for r in rows if isinstance(r["status"], int) and r["status"] >= 500]
    after_kill = [r for r in five if load.killed_at is not None and r["t"] >= load.killed_at]
    return {
        "requests": len(rows), "served_greedy": len(greedy), "wrong_answers": sum(not r["right"] for r in greedy),
        "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
        "median_latency_s": round(statistics.median(lat), 3) if lat else None,
        "status_by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "refusals_with_wrong_status": len(unexpected), "5xx": len(five), "5xx_after_kill": len(after_kill),
        "failed_after_kill": len(rows) - len(before_kill),
        **extra,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=300, help="seconds of load after the warm-up")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the server (default: unset, torch's own choice)")
    ap.add_argument("--kill-rank", type=int, default=None, help="SIGKILL this rank after --kill-after seconds")
    ap.add_argument("--kill-after", type=float, default=30)
    ap.add_argument("--out", default=None, help="write the report here (JSON)")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then spdecode serve's arguments")
    args = ap.parse_args()
    serve_args = [a for a in args.serve_args if a != "--"]

    t_ref = time.time()
    refs = references(args.model, args.max_tokens)
    print(f"[load] AR fp32 references for {len(refs)} prompts in {time.time() - t_ref:.0f} s", file=sys.stderr)
    env = {"OMP_NUM_THREADS": None if args.threads is None else str(args.threads)}
    server = Server(["--model", args.model, *serve_args], ready_s=600, env=env)
    try:
        client = server.client()
        usable = client.models.list().data[0].model_extra["max_model_len"]
        load = Load(server, args.model, refs, args.max_tokens, usable)
        for p in PROMPTS:  # warm-up: every prompt once, then memory is read
            load.greedy(client, random.Random(PROMPTS.index(p)))
        warm_rows = len(load.rows)
        rss_warm = rss_mb(server.processes())
        deadline = time.time() + args.duration
        threads = [threading.Thread(target=run_client, args=(load, i, deadline, args.seed), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        kill = {}
        if args.kill_rank is not None:
            time.sleep(args.kill_after)
            os.kill(rank_pid(server, args.kill_rank), signal.SIGKILL)
            load.killed_at = time.time()
            try:
                _, err = server.proc.communicate(timeout=60)
            except Exception:  # noqa: BLE001 - reported as not ending
                err = ""
            ended = time.time() - load.killed_at
            kill = {"killed_rank": args.kill_rank, "server_exit_code": server.proc.returncode,
                    "exit_within_s": round(ended, 2),
                    "names_rank": f"rank {args.kill_rank}" in err,
                    "stderr_tail": err.strip().splitlines()[-3:]}
        for t in threads:
            t.join(args.duration + 600)
        rss_end = rss_mb(server.processes())
        pids = server.processes()
    finally:
        code, _ = server.stop(signal.SIGTERM, timeout=60) if server.proc.poll() is None else (server.proc.returncode,
                                                                                           "")
    left = alive(pids) if server.proc.poll() is not None else pids
    if args.kill_rank is None:
        # Rows recorded during the warm-up are not part of the load.
        load.rows = load.rows[warm_rows:]
    report = summarize(load, {
        "serve_args": serve_args, "clients": args.clients, "duration_s": args.duration, "max_tokens": args.max_tokens,
        "rss_after_warmup_mb": round(rss_warm, 1), "rss_end_mb": round(rss_end, 1),
        "rss_growth": round(rss_end / rss_warm - 1, 4) if rss_warm else None,
        "sigterm_exit_code": code if args.kill_rank is None else None, "processes_left": len(left),
        "cpu": cpu_name(), "python": platform.python_version(), **kill})
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    ok = (report["wrong_answers"] == 0 and report["refusals_with_wrong_status"] == 0 and not left
          and (report["5xx"] == report["5xx_after_kill"]))
    if args.kill_rank is not None:
        ok = ok and kill["server_exit_code"] not in (0, None) and kill["exit_within_s"] <= 10 and kill["names_rank"]
    else:
        ok = ok and report["rss_growth"] is not None and report["rss_growth"] <= 0.10 and code == 0
    return 0 if ok else 1


def cpu_name() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
