"""spdecode: lossless pipeline-parallel speculative decoding for Hugging Face decoder-only models.

The package's layers, from the ground up: runtime/ (models, the staged target, KV cache, sampling,
verification, metrics), drafting/ (the PDM and every drafter), methods/ (AR, SD, SPD and its
engine core, SPEED, PipeSpec), training/, distributed/ (one process per stage), serve/ (the
OpenAI-compatible server), plan/ (costs, simulator, planner), bench/, and the command line
(cli/), which nothing imports.
"""

from .methods.ar import generate_ar
from .methods.sd import generate_sd
from .methods.spd import generate_spd
from .runtime.errors import SpdError
from .runtime.generation import eos_ids
from .runtime.models import load_model
from .runtime.sampling import SamplingParams
from .runtime.staged import StagedTarget, split_layers

__all__ = ["SamplingParams", "SpdError", "StagedTarget", "eos_ids", "generate_ar", "generate_sd", "generate_spd",
           "load_model", "split_layers"]
__version__ = "0.1.0"
