"""Start a distributed run on this machine: torchrun with one process per stage.

torchrun (torch.distributed.run) does the rendezvous and, when a rank fails, stops the others
and reports which one failed; we only build its command line.
"""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_command(nproc: int, worker_args: list[str], master_port: int | None = None,
                     rdzv_endpoint: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if rdzv_endpoint:
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
    elif master_port:
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(master_port)]
    else:
        cmd += ["--standalone"]  # a free port on localhost
    return cmd + ["-m", "spdecode.dist_main", *worker_args]


def run_distributed(nproc: int, worker_args: list[str], master_port: int | None = None,
                    rdzv_endpoint: str | None = None, quiet_launcher: bool = True) -> int:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one core per rank; silences torchrun's notice
    proc = subprocess.Popen(torchrun_command(nproc, worker_args, master_port, rdzv_endpoint), env=env,
                            stderr=subprocess.PIPE if quiet_launcher else None, text=True)
    try:
        _, err = proc.communicate()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(30)
        raise
    if err:
        # Keep the ranks' own lines (errors, warnings, summaries); drop torchrun's banners and tracebacks.
        lines = [line for line in err.splitlines() if line.startswith(("error:", "warning:", "[spd", "[speed"))]
        if proc.returncode and not any(line.startswith("error:") for line in lines):
            failed = [line.strip() for line in err.splitlines() if "rank" in line and ":" in line][-3:]
            lines.append("error: a pipeline rank failed: " + " | ".join(failed))
        for line in lines:
            print(line, file=sys.stderr)
    return proc.returncode
