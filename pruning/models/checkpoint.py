"""Finding, checking, reading and loading HF checkpoints (local directory or hub id), safetensors only, and
their sizes. Per-layer jobs read only the tensors they need from the shards; ``load_model`` loads a whole model."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import moe
from . import SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_adapter

MOE_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class ModelPathError(ValueError):
    pass


def resolve_dir(name_or_path: str, trust_remote_code: bool = False) -> Path:
    """A local checkpoint directory for a path or a hub id (from the HF cache, or downloaded when online)."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise ModelPathError(f"model.name_or_path: {name_or_path!r} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
        )
    except Exception as exc:  # offline, unknown id, gated
        raise ModelPathError(
            f"model.name_or_path: {name_or_path!r} is neither a local directory nor a reachable hub id ({type(exc).__name__})"
        ) from None


def read_config(model_dir: Path) -> dict:
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        raise ModelPathError(f"model.name_or_path: no config.json in {model_dir}")
    return json.loads(cfg.read_text())


def check_moe_config(config: dict) -> None:
    """One clear error for a dense model or an unsupported architecture."""
    if not any(config.get(k) for k in MOE_EXPERT_KEYS):
        raise UnsupportedModelError(
            f"model.name_or_path: model_type {config.get('model_type')!r} is a dense (non-MoE) model; "
            f"an MoE checkpoint is required ({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    problems = get_adapter(config).problems()
    if problems:
        raise UnsupportedModelError(problems[0])


def check_weights(model_dir) -> None:
    """The checkpoint's safetensors weights, from their headers alone (no tensor is read): an index that parses
    and whose every shard is there and holds the keys it lists there, or one ``model.safetensors``; every shard's
    header intact and its tensor data inside the file. One ``ModelPathError`` line naming the file."""
    from ..safetensors_io import check_file

    model_dir = Path(model_dir)
    allowed = "allowed: a complete safetensors checkpoint (model.safetensors, or an index and every shard it names)"
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
            assert isinstance(wmap, dict) and wmap and all(isinstance(v, str) for v in wmap.values())
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ModelPathError(f"model.name_or_path: {index} is not a safetensors index with a weight_map; {allowed}") from None
        shards: dict[str, list[str]] = {}
        for k, f in wmap.items():
            shards.setdefault(f, []).append(k)
    elif (model_dir / "model.safetensors").is_file():
        shards = {"model.safetensors": []}
    else:
        bins = sorted(f.name for f in model_dir.glob("*.bin"))
        what = f"only PyTorch weights ({bins[0]})" if bins else "no weights"
        raise ModelPathError(f"model.name_or_path: {model_dir} has {what}; {allowed}")
    for fname, keys in sorted(shards.items()):
        path = model_dir / fname
        if not path.is_file():
            raise ModelPathError(f"model.name_or_path: {index.name} names {fname}, which is missing from {model_dir}; {allowed}")
        try:
            _, tensors = check_file(path)
        except (OSError, ValueError) as exc:
            raise ModelPathError(f"model.name_or_path: {exc}; {allowed}") from None
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ModelPathError(f"model.name_or_path: {index.name} lists {missing[0]} in {path}, which lacks it "
                                 f"({len(missing)} such keys); {allowed}")


def load_config(model_dir):
    """config.json as attributes, without importing transformers (per-layer jobs stay light)."""
    from types import SimpleNamespace

    return SimpleNamespace(**read_config(Path(model_dir)))


def torch_dtype(name) -> torch.dtype:
    """params.yaml's dtype name ('float32', 'bfloat16', 'float16') as a torch dtype (a torch dtype passes)."""
    if isinstance(name, torch.dtype):
        return name
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model_dir, dtype="float32", device="cpu", trust_remote_code: bool = False, **placement):
    """Whole model, safetensors only, the family's attention (sdpa where it has it) and the eager experts loop
    (observers see real calls). ``placement`` (``device_map``, ``max_memory``, ``offload_folder``) hands the
    placement to accelerate's big-model inference instead of moving the model to ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir),
        dtype=torch_dtype(dtype),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
        attn_implementation=get_adapter(read_config(Path(model_dir))).attn_implementation,
        experts_implementation="eager",
        **placement,
    )
    return (model if placement.get("device_map") else model.to(device)).eval()


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ModelPathError(f"model.name_or_path: no safetensors weights in {model_dir}")
    with _open_shard(single) as f:
        return {k: "model.safetensors" for k in f.keys()}


def read_tensors(model_dir, keys, wmap: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Read only ``keys`` from the checkpoint's shards (never the whole model); ``wmap``: its weight map, if known.
    A shard that cannot be read, or a floating tensor holding NaN or Inf, fails with one line naming the shard."""
    model_dir = Path(model_dir)
    wmap = _weight_map(model_dir) if wmap is None else wmap
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(wmap[k], []).append(k)
    out = {}
    for fname, ks in sorted(by_file.items()):
        with _open_shard(model_dir / fname) as f:
            for k in ks:
                out[k] = _read_checked(f, model_dir / fname, k)
    return out


def _open_shard(path):
    """``safe_open`` on a shard; a file that cannot be opened raises one line naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # SafetensorsError, OSError: a shard truncated or overwritten since the workflow loaded
        raise ModelPathError(f"{path}: cannot read the shard ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                             f"the checkpoint is corrupt or truncated") from None


FINITE_CHECK_ELEMENTS = 1 << 24  # elements per piece of the finite check (a small temporary)


def _read_checked(f, path, key) -> torch.Tensor:
    """One tensor of an open shard, failing with one line naming the shard when it cannot be read or its floating
    point values hold NaN or Inf (corrupt tensor data behind an intact header)."""
    try:
        t = f.get_tensor(key)
    except Exception as exc:
        raise ModelPathError(f"{path}: cannot read tensor {key} ({type(exc).__name__}); the checkpoint is corrupt "
                             f"or truncated") from None
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        flat = t.reshape(-1)
        for a in range(0, flat.numel(), FINITE_CHECK_ELEMENTS):
            if not bool(torch.isfinite(flat[a:a + FINITE_CHECK_ELEMENTS]).all()):
                raise ModelPathError(f"{path}: tensor {key} holds NaN or Inf values; the checkpoint is corrupt")
    return t


class ShardReader(Mapping):
    """The checkpoint's tensors under ``keys`` as a mapping that reads each tensor from its shard when asked for it
    (nothing is held: a consumer that drops what it read keeps one tensor in memory at a time)."""

    def __init__(self, model_dir, keys):
        self.model_dir, self.wmap, self._keys = Path(model_dir), _weight_map(Path(model_dir)), list(keys)

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        with _open_shard(self.model_dir / self.wmap[key]) as f:
            return _read_checked(f, self.model_dir / self.wmap[key], key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


def read_experts(model_dir, adapter, layer: int) -> moe.Experts:
    """One layer's routed experts as ``moe.Experts`` (canonical layout, the family's activation and biases), read
    from the shards in whichever layout they are stored."""
    model_dir = Path(model_dir)
    wmap = _weight_map(model_dir)
    for layout, keys in adapter.expert_weight_keys(layer).items():
        if all(k in wmap for k in keys):
            return adapter.experts_from_tensors(ShardReader(model_dir, keys), layer, layout)
    raise ModelPathError(f"{model_dir}: layer {layer} expert weights not found under known key layouts")


def read_shared_experts(model_dir, adapter, layer: int):
    """One layer's shared MLP as a one-expert ``moe.Experts`` and its gate weight (None if it has none)."""
    keys = list(adapter.shared_weight_keys(layer).values())
    return adapter.shared_from_tensors(read_tensors(Path(model_dir), keys), layer)


def read_router(model_dir, adapter, layer: int) -> moe.Router:
    """One layer's router (weight, logit bias and selection bias where the family has them) from the shards."""
    model_dir = Path(model_dir)
    wmap = _weight_map(model_dir)
    found = {}
    for role, keys in adapter.router_keys(layer).items():
        key = next((k for k in keys if k in wmap), None)
        if key is not None:
            found[role] = read_tensors(model_dir, [key])[key]
    if "weight" not in found:
        raise ModelPathError(f"{model_dir}: layer {layer} router weight not found under known key layouts")
    return adapter.router_from_tensors(found)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tensor_bytes(checkpoint_dir) -> int:
    """Bytes of tensor data in a checkpoint's safetensors files (from their headers; no tensor is read)."""
    from ..safetensors_io import read_header

    return sum(t.nbytes for f in sorted(Path(checkpoint_dir).glob("*.safetensors")) for t in read_header(f)[1].values())


def file_bytes(checkpoint_dir) -> int:
    """Bytes on disk of a checkpoint's safetensors files (tensor data plus headers)."""
    return sum(f.stat().st_size for f in Path(checkpoint_dir).glob("*.safetensors"))
