"""The `spdecode` command line: generate, serve, bench, train, data, plan, ...

Bad input ends in a one-line `error: ...` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
import warnings

from ..runtime.errors import SpdError
from .options import config_from, resolve_auto, resolve_backend
from .parser import build_parser

__all__ = ["build_parser", "config_from", "main"]

EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars would interleave with streamed text
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # Library chatter (e.g. transformers' generation-config notes) is not for the user;
            # our own warnings (clamped lengths, untrained drafts) still show.
            warnings.filterwarnings("ignore", module="transformers")
            resolve_backend(args)
            resolve_auto(args)
            return args.func(args)
    except SpdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130



if __name__ == "__main__":
    sys.exit(main())
