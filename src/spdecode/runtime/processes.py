"""How spdecode starts the helper processes that run torch (PipeSpec's stages, the cost file's
timing neighbours and link probes).

Never `fork` from a process that has run torch: its OpenMP and intra-op threads do not survive a
fork, and a child can hang on a lock a vanished thread held. `spawn` is safe but starts every
child from nothing: importing torch and transformers cost each PipeSpec stage about 4 s on a
2-vCPU EPYC (a two-drafter chain ready in 6.1 s). A fork server is safe too (it is a fresh process
that has imported torch but never run an op, so it has no threads to lose) and, with those imports
preloaded once, the same chain was ready in 1.6 s from the second start on.
"""

from __future__ import annotations

import torch.multiprocessing as mp

# Imported once by the fork server; every child it forks starts with them loaded.
PRELOAD = ("torch", "transformers")


def process_context(*modules: str):
    """A multiprocessing context whose children may run torch: the fork server where the platform
    has one (Linux, macOS), else spawn (Windows). `modules`: what the children import beyond
    PRELOAD (the module of their entry point, say)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # Takes effect when the server starts (with this process's first child); later calls change
    # nothing. A module that fails to import is skipped by the server, and the child imports it.
    ctx.set_forkserver_preload([*PRELOAD, *modules])
    return ctx
