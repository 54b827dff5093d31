"""`--backend auto`: which weight backend is fastest on this machine, measured once and cached.

The probe loads the model in each candidate backend and times what decoding repeats: a one-row
step (AR) and a nine-row pass (a verify pass over the root and an 8-node draft tree), each through
every layer and the LM head at context 128, with the thread count the run will use. The backend
with the smallest sum of the two wins: AR and every speculative method then run on it, so every
ratio a run reports is like for like. The verdict is cached under the cache directory, keyed by
everything that changes it (model weights, CPU and its flags, usable cores, threads, torch, the
environment variables that cap the kernels' instruction sets); a changed key or an unreadable
file means measuring again.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from .machine import describe_cpu

PROBE_ROWS = (1, 9)
PROBE_CONTEXT = 128
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "FBGEMM_ENABLE_INSTRUCTIONS",
              "OMP_NUM_THREADS")


def probe_file():
    from .models import cache_dir

    return cache_dir() / "backend_probe.json"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spdecode")
    except PackageNotFoundError:
        return "unknown"


def probe_key(model_name: str, device: str, threads: int) -> str:
    from .models import files_fingerprint, model_backends, resolve_model

    source = resolve_model(model_name)
    weights = files_fingerprint(source) if not isinstance(source, str) else source
    env = {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}
    return json.dumps({"weights": weights, "device": device, "threads": threads, "machine": describe_cpu(),
                       "torch": torch.__version__, "spdecode": package_version(), "env": env,
                       "backends": model_backends(model_name, device)}, sort_keys=True)


def time_passes(model, rows=PROBE_ROWS, context: int = PROBE_CONTEXT, reps: int = 7) -> dict[int, float]:
    """Median seconds of a pass over `rows` new tokens (every layer, the head on every row) after
    `context` cached tokens: what a decode step (1 row) and a verify pass (1 + tree nodes) cost."""
    from .staged import StagedTarget

    target = StagedTarget(model, 1, capacity=context + max(rows) + 1)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, context + max(rows)), generator=gen).to(target.device)
    sync = torch.cuda.synchronize if target.device.type == "cuda" else (lambda: None)
    out = {}
    with torch.inference_mode():
        target.reserve(context + max(rows))
        target.forward(ids[:, :context], 0)
        for q in rows:
            times = []
            for rep in range(reps + 2):  # two warm-ups
                target.rollback(context)
                sync()
                t0 = time.perf_counter()
                target.logits(target.forward(ids[:, context:context + q], context))
                sync()
                if rep >= 2:
                    times.append(time.perf_counter() - t0)
            out[q] = statistics.median(times)
    return out


def measure_backends(model_name: str, device: str, threads: int, backends: list[str] | None = None,
                     log=None) -> dict[str, dict[int, float]]:
    """backend -> {rows: seconds} for every candidate backend, at `threads` threads."""
    from .models import load_model, model_backends

    backends = backends or model_backends(model_name, device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = {}
        for b in backends:
            model, _ = load_model(model_name, b, device, tokenizer=False)
            out[b] = time_passes(model)
            if log:
                log(f"  {b}: " + ", ".join(f"{q} rows {1e3 * t:.1f} ms" for q, t in out[b].items()))
            del model
        return out
    finally:
        torch.set_num_threads(before)


def pick(times: dict[str, dict[int, float]]) -> str:
    """The backend with the smallest one-row step plus nine-row pass."""
    return min(times, key=lambda b: sum(times[b].values()))


def choose_backend(model_name: str, device: str = "cpu", threads: int | None = None, log=None) -> str:
    """The measured fastest backend for `model_name` on this machine at `threads` (default: torch's
    current count), from the cache when its key matches, else measured now (a few seconds) and cached."""
    threads = threads or torch.get_num_threads()
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    key = probe_key(model_name, device, threads)
    path = probe_file()
    cached: dict = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if not isinstance(cached, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            log(f"backend auto: the cached probe {path} is unreadable ({exc}); measuring again")
            cached = {}
    entry = cached.get(key)
    if isinstance(entry, dict) and entry.get("choice") in entry.get("times", {}):
        return entry["choice"]
    log(f"backend auto: timing a 1-row step and a 9-row pass of {model_name} per backend with {threads} "
        f"thread{'s' if threads > 1 else ''} (once; cached in {path})")
    times = measure_backends(model_name, device, threads, log=log)
    choice = pick(times)
    log(f"backend auto: {choice} (1 row + 9 rows: "
        + ", ".join(f"{b} {1e3 * sum(t.values()):.1f} ms" for b, t in times.items()) + ")")
    cached[key] = {"choice": choice, "times": {b: {str(q): s for q, s in t.items()} for b, t in times.items()},
                   "measured_at": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cached, indent=1))
    os.replace(tmp, path)
    return choice
