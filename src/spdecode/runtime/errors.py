"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class SpdError(Exception):
    """Bad input or an unusable environment: reported to the user without a traceback."""
