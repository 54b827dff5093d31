"""spdecode: lossless pipeline-parallel speculative decoding for Hugging Face decoder-only models."""

from .runtime.errors import SpdError
from .runtime.models import load_model
from .runtime.staged import StagedTarget, split_layers

__all__ = ["SpdError", "StagedTarget", "load_model", "split_layers"]
__version__ = "0.1.0"
