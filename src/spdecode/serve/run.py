"""Run the server: uvicorn in this (the main) thread, the engine in its own, and a clean end.

SIGTERM or Ctrl-C: uvicorn stops accepting, the engine halts the running request (its client gets
an error, not a truncated answer passed off as complete) and fails the waiting ones, then runs
its on_close (the pipeline's SHUTDOWN). A fatal engine error (a pipeline rank died) makes the
server exit too, with a non-zero code, instead of answering every later request with an error.
"""

from __future__ import annotations

import signal
import sys

import uvicorn

from .app import create_app
from .engine import Decoder, Engine
from .metrics import ServerMetrics

EXIT_PIPELINE_FAILED = 3


class _Server(uvicorn.Server):
    """uvicorn's server, which also closes the engine as soon as it is told to exit."""

    def __init__(self, config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        self.engine.close()
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:  # a requested stop, not a crash: exit 0 (uvicorn would re-raise it)
            self._captured_signals.remove(sig)


def serve(decoder: Decoder, tokenizer, eos, model_id: str, context_length: int, host: str = "127.0.0.1",
          port: int = 8000, max_queue: int = 32, description: str = "", log_level: str = "warning",
          fingerprint: str = "spdecode") -> int:
    """Serve until SIGTERM/SIGINT (exit code 0) or a fatal engine error (EXIT_PIPELINE_FAILED)."""
    metrics = ServerMetrics()
    failure: list[str] = []
    server: list[_Server] = []

    def on_fatal(message: str) -> None:  # called in the engine thread
        failure.append(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        if server:
            server[0].should_exit = True

    engine = Engine(decoder, tokenizer, eos, max_queue, on_fatal=on_fatal, metrics=metrics)
    app = create_app(engine, tokenizer, model_id, context_length, metrics, description, fingerprint)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            lifespan="off")
    server.append(_Server(config, engine))
    engine.start()
    print(f"[serve] {model_id} on http://{host}:{port}/v1 ({description})", file=sys.stderr, flush=True)
    try:
        server[0].run()
    except SystemExit:  # uvicorn could not start (it logged why, e.g. the port is in use)
        pass
    finally:
        engine.close()
        engine.join(30)
    if failure:
        return EXIT_PIPELINE_FAILED
    if not server[0].started:
        print(f"error: could not serve on {host}:{port} (is the port in use?)", file=sys.stderr, flush=True)
        return 2
    return 0
