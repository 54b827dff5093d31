"""The machine profile: what `spdecode tune` measured for one model on this machine, and its key.

One JSON file per model, device and key under the cache directory's `profiles/`. It holds the cost file of every
backend that survived the probe (plan/costs.py's format, so the planner's simulator reads it as
is), the link, and the verdicts `--method auto` reached with it. Its key names everything that
changes those timings: the model's and its drafts' checksums, the CPU's model and flags, torch's
dispatch level, the usable cores, torch's and spdecode's versions and the variables that cap the
kernels' instruction sets. A profile whose key differs, that cannot be read, or whose AR step the
start-up check finds more than 20 % off is never used: it is measured again, with a message
saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

VERSION = 3  # 2: int4w among the backends (model_backends, in the key); compact decoder layers; 3: the
# head and drafter passes timed as they run (plan.costs: after the layers, after the target)
STALE_STEP = 0.20  # a start-up AR step this far off the profile's means the machine is not the one measured


def profiles_dir() -> Path:
    from ..runtime.models import cache_dir

    return cache_dir() / "profiles"


def _stem(model_name: str, device: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_name}-{device}").strip("_")


def profile_path(model_name: str, device: str, key: dict) -> Path:
    """One file per key: machines that share a home directory, or runs with capped kernels, each
    keep their own profile instead of measuring over each other's."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return profiles_dir() / f"{_stem(model_name, device)}-{digest}.json"


def path_of(profile: dict) -> Path:
    return profile_path(profile["key"]["model"], profile["key"]["device"], profile["key"])


def draft_checksum(directory: Path) -> str:
    """sha256 over a draft directory's files (weights, config, shipped acceptance), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in directory.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def profile_key(model_name: str, device: str) -> dict:
    import torch

    from ..drafting.pdm import bundled_drafts
    from ..runtime.backend_probe import KERNEL_ENV, package_version
    from ..runtime.machine import describe_cpu
    from ..runtime.models import files_fingerprint, model_backends, resolve_model

    source = resolve_model(model_name)
    cpu = describe_cpu()
    return {"model": model_name, "weights": files_fingerprint(source) if not isinstance(source, str) else source,
            "drafts": {d.name: draft_checksum(d) for d in bundled_drafts(model_name)}, "device": device,
            "cpu": cpu["cpu"], "flags": cpu["flags"], "capability": cpu["capability"],
            "usable_cores": cpu["usable_cores"], "torch": torch.__version__, "spdecode": package_version(),
            "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
            "backends": model_backends(model_name, device)}


def load_profile(model_name: str, device: str, key: dict) -> tuple[dict | None, str]:
    """(the profile, "") when one is stored under this key; else (None, why it must be measured)."""
    path = profile_path(model_name, device, key)
    if not path.exists():
        return None, changed_since(model_name, device, key)
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("costs"), dict):
            raise ValueError("not a machine profile")
    except (OSError, ValueError) as exc:
        return None, f"the machine profile {path} is unreadable ({exc})"
    if data.get("version") != VERSION:  # same key: this spdecode times the parts another way
        return None, (f"the machine profile {path} is version {data.get('version')}, and this spdecode measures "
                      f"version {VERSION}")
    if data.get("key") != key:
        return None, f"the machine profile {path} was measured under another key"
    if not data["costs"]:
        return None, f"the machine profile {path} holds no timings"
    return data, ""


def changed_since(model_name: str, device: str, key: dict) -> str:
    """Why no profile matches: what differs from the newest profile of this model and device."""
    for old in sorted(profiles_dir().glob(f"{_stem(model_name, device)}-*.json"), key=lambda p: -p.stat().st_mtime):
        try:
            before = json.loads(old.read_text())["key"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        changed = [k for k in key if before.get(k) != key[k]]
        if changed:
            return f"{', '.join(changed)} changed since the machine profile {old.name} was measured"
    return f"no machine profile for {model_name} on {device} yet"


def save_profile(data: dict) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = path_of(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def new_profile(key: dict, costs: dict, probe: dict, link: dict | None, full: bool, seconds: float) -> dict:
    return {"version": VERSION, "key": key, "measured_at": time.time(), "tune_s": seconds, "full": full,
            "probe": probe, "costs": costs, "link": link, "verdicts": {}}


def verdict_key(backend: str | None, distributed: bool) -> str:
    """Where a verdict is cached in the profile: what constrained it."""
    return json.dumps({"backend": backend, "distributed": distributed}, sort_keys=True)


def step_seconds(profile: dict, backend: str, threads: int, context: int = 128) -> float | None:
    """The profile's whole AR step (embedding, every layer, head, argmax) at `context`, or None."""
    from ..plan.cost_model import at_context

    by_threads = profile["costs"].get(backend, {}).get("target", {}).get(str(threads))
    if not by_threads or not by_threads.get("step"):
        return None
    return at_context(by_threads["step"], context)


def off_by(measured: float, expected: float) -> float:
    """How far a measurement is from the profile's, relative to the profile's."""
    return abs(measured - expected) / expected
