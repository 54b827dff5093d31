"""spdecode: lossless pipeline-parallel speculative decoding for Hugging Face decoder-only models."""

from .errors import SpdError
from .models import load_model
from .staged import StagedTarget, split_layers

__all__ = ["SpdError", "StagedTarget", "load_model", "split_layers"]
__version__ = "0.1.0"
