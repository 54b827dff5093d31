"""Start a distributed run on this machine: torchrun with one process per stage.

torchrun (torch.distributed.run) does the rendezvous and, when a rank fails, stops the others
and reports which one failed. We build its command line and, from its stderr, keep the ranks' own
lines (errors with their tracebacks, warnings, summaries); a rank that died without a word (killed)
is named from torchrun's failure report.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

# Prefix of the traceback lines a rank prints under its `error: rank R: unexpected ...` line.
TRACE_PREFIX = "  rank {rank} | "
_TRACE = re.compile(r"^  rank \S+ \| ")
_KEEP = ("error:", "warning:", "[spd", "[speed", "[serve")


def torchrun_command(nproc: int, worker_args: list[str], master_port: int | None = None,
                     rdzv_endpoint: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
    elif master_port:
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    else:
        cmd += ["--standalone"]  # a free port on localhost
    return cmd + ["-m", "spdecode.distributed.worker", *worker_args]


def run_distributed(nproc: int, worker_args: list[str], master_port: int | None = None,
                    rdzv_endpoint: str | None = None) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one core per rank; silences torchrun's notice
    proc = subprocess.Popen(torchrun_command(nproc, worker_args, master_port, rdzv_endpoint), env=env,
                            stderr=subprocess.PIPE, text=True)
    # SIGTERM (e.g. stopping `spdecode serve`) goes on to torchrun, which stops every rank with it;
    # we then report as usual once torchrun is gone.
    stopped = []

    def stop(*_):
        stopped.append(True)
        proc.terminate()

    previous = signal.signal(signal.SIGTERM, stop)
    seen, shown = [], set()
    try:
        for line in proc.stderr:  # the ranks' own lines as they come (a server runs for long)
            line = line.rstrip("\n")
            seen.append(line)
            if is_rank_line(line):
                print(line, file=sys.stderr, flush=True)
                shown.add(line)
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(30)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:  # we were told to stop: torchrun's exit code and report only say that it stopped the ranks
        return 0
    for line in rank_lines("\n".join(seen), proc.returncode):
        if line not in shown:  # what only torchrun's report tells (a rank killed without a word)
            print(line, file=sys.stderr)
    return proc.returncode


def is_rank_line(line: str) -> bool:
    """A rank's own line (an error and its traceback, a warning, a summary), not torchrun's."""
    return line.startswith(_KEEP) or bool(_TRACE.match(line))


def rank_lines(err: str, returncode: int) -> list[str]:
    """The lines of torchrun's stderr to show: the ranks' own (errors and their tracebacks, warnings,
    summaries), not torchrun's banners and tracebacks; plus `error: rank R: ...` for a rank that
    torchrun reports failed but that said nothing itself (killed, or died before it could). Ranks
    ended by SIGTERM are left out unless they are the first failure: that is torchrun stopping the rest."""
    lines = [line for line in err.splitlines() if is_rank_line(line)]
    if returncode:
        for rank, code, root in torchrun_failures(err):
            if code == -signal.SIGTERM and not root:
                continue
            if not any(line.startswith(f"error: rank {rank}:") for line in lines):
                try:
                    what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                except ValueError:
                    what = f"exited with code {code}"
                lines.append(f"error: rank {rank}: {what}")
        if not any(line.startswith("error:") for line in lines):
            failed = [line.strip() for line in err.splitlines() if "rank" in line and ":" in line][-3:]
            lines.append("error: a pipeline rank failed: " + " | ".join(failed))
    return lines


def torchrun_failures(err: str) -> list[tuple[int, int, bool]]:
    """(rank, exit code, whether it is the root cause) of each failure in torchrun's report
    (`rank : R (local_rank: ...)` then `exitcode : X (pid: ...)`, the first failure under `Root Cause`)."""
    out, rank, root = [], None, False
    for line in err.splitlines():
        if line.startswith("Root Cause"):
            root = True
        m = re.match(r"^\s*rank\s*:\s*(\d+)", line)
        if m:
            rank = int(m.group(1))
            continue
        m = re.match(r"^\s*exitcode\s*:\s*(-?\d+)", line)
        if m and rank is not None:
            out.append((rank, int(m.group(1)), root))
            rank = None
    return out
