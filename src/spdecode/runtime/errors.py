"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class SpdError(Exception):
    """Bad input or an unusable environment: reported to the user without a traceback."""


class DecoderFailure(SpdError):
    """The decoder itself failed (a stage process died or hung), not the request it was running:
    a server restarts it where it can, or ends."""


# What each optional feature imports, and the extra of pyproject.toml that installs it.
EXTRAS = {"serve": ("fastapi", "uvicorn", "prometheus_client"), "plot": ("matplotlib",), "data": ("datasketch",)}


def require_extra(extra: str, what: str) -> None:
    """Fail with the install line when `what` needs an extra that is not installed."""
    from importlib.util import find_spec

    missing = [m for m in EXTRAS[extra] if find_spec(m) is None]
    if missing:
        raise SpdError(f"{what} needs {', '.join(missing)}: pip install 'spdecode[{extra}]'")
