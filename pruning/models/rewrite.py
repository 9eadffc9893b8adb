"""Rewriting a checkpoint tensor by tensor, never loading the model: masks, updated weights and expert removal
applied while the base's shards stream through.

For every shard of the base (index order) and every tensor in it (file order) the tensor alone is read, changed
or passed on as it is, and written to an output shard; output shards follow the base's and are split further
when they would exceed ``max_shard_size``. A safetensors file is its header (every tensor's dtype, shape and
byte offsets) then the tensors' bytes, and no change here alters a dtype, and every output shape is known from
the base's headers, so each output header is written first and the tensors after it one at a time: the most
held in memory is about one tensor (plus one expert's slice of a mask or of updated weights). Files are read
with plain reads, not memory maps, so the base's pages stay in the page cache and out of the process.

The result keeps the base's key layout (fused or per-expert experts, the hub's block names) and its stored
dtypes (a mask multiplies exactly; updated weights are cast to the stored dtype), holds an index
(``model.safetensors.index.json``) unless the base was one ``model.safetensors`` and the result fits in one
shard, and loads with stock ``from_pretrained``. config.json (updated for expert removal), the generation
config and the tokenizer's files are copied. Which part of which canonical tensor each key holds, and which
keys expert removal changes, is the adapter's (``MoEAdapter.weight_key_parts``, ``expert_removal_keys``).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..safetensors_io import (DTYPES, SafetensorsReader, SafetensorsWriter, TensorInfo, _numel,
                              read_header, read_metadata)
from . import get_adapter

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes of tensor data per output shard
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
ROW_BLOCK = 1 << 18    # elements per block of rows worked on at once (masking, N:M checks): small temporaries
SHARED = "shared."     # the prefix of the shared experts' canonical tensors in a layer's mask and weight files
# files of the base copied beside the weights (config.json is rewritten): generation config, tokenizer, and the
# modelling code of a trust_remote_code model
COPIED = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
          "merges.txt", "chat_template*", "*.tiktoken", "*.py")

class Part(NamedTuple):
    """What one checkpoint key of a layer's prunable weights holds (``MoEAdapter.weight_key_parts``)."""

    name: str            # the canonical tensor: 'gate_up' (E, 2I, H), 'down' (E, H, I), 'shared.gate_up', 'shared.down'
    expert: int | None   # the one expert it holds (None: every expert, in the parameter's layout)
    half: int | None     # of that expert's gate_up rows, 0: the gate's, 1: the up projection's; None: all rows


# -- a checkpoint's keys, seen through its adapter --------------------------------------------------------------

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class Checkpoint:
    """A checkpoint directory, from its config and the shards' headers only: which shard holds each key (shards
    in index order, keys in file order), dtypes, shapes and offsets; each MoE layer's expert layout, the keys
    holding prunable weights (``parts``: key -> (layer, Part)), the model's name of each key and the routers'
    weight keys."""

    def __init__(self, model_dir):
        from .checkpoint import ModelPathError, read_config

        self.dir = Path(model_dir)
        self.config = read_config(self.dir)
        self.adapter = get_adapter(self.config)
        index = self.dir / INDEX
        if index.is_file():
            idx = json.loads(index.read_text())
            wmap, self.index_metadata, self.single = idx["weight_map"], idx.get("metadata") or {}, False
            files = sorted(set(wmap.values()))
        elif (self.dir / SINGLE).is_file():
            wmap, self.index_metadata, self.single, files = None, {}, True, [SINGLE]
        else:
            raise ModelPathError(f"model.name_or_path: no safetensors weights in {self.dir}")
        self.shards: dict[str, tuple[dict, dict[str, TensorInfo]]] = {}
        self.tensors: dict[str, tuple[str, TensorInfo]] = {}
        for fname in files:
            meta, tensors = read_header(self.dir / fname)
            if wmap is not None:
                missing = [k for k, f in wmap.items() if f == fname and k not in tensors]
                if missing:
                    raise ModelPathError(f"{self.dir / fname}: the index lists {missing[:3]} there, the file lacks them")
                tensors = {k: v for k, v in tensors.items() if wmap.get(k) == fname}
            self.shards[fname] = (meta, tensors)
            self.tensors.update({k: (fname, v) for k, v in tensors.items()})
        self.by_layer: dict[int, dict[str, tuple[int, ...]]] = {}
        for key, (_, info) in self.tensors.items():
            m = _LAYER.match(key)
            if m:
                self.by_layer.setdefault(int(m[1]), {})[key] = info.shape
        self.layouts: dict[int, str] = {}
        self.parts: dict[str, tuple[int, Part]] = {}
        self.names: dict[str, str] = {}
        self.router_weight: dict[int, str] = {}
        a = self.adapter
        for i in a.moe_layer_indices():
            keys = self.by_layer.get(i, {})
            layout = a.checkpoint_layout(i, keys)
            if layout is None:
                raise ModelPathError(f"{self.dir}: layer {i} expert weights not found under known key layouts")
            self.layouts[i] = layout
            self.parts.update({k: (i, p) for k, p in a.weight_key_parts(i, layout).items() if k in keys})
            self.names.update(a.checkpoint_key_names(i, layout))
            router = next((k for k in a.router_keys(i)["weight"] if k in keys), None)
            if router is None:
                raise ModelPathError(f"{self.dir}: layer {i} router weight not found under known key layouts")
            self.router_weight[i] = router

    def model_name(self, key: str) -> str:
        """The model's state-dict name the key loads into."""
        return self.names.get(key, key)

    def removal(self, kept: dict[int, list[int]]) -> dict[str, tuple[str | None, list[int] | None]]:
        """The keys expert removal changes: key -> (new key or None if it goes, the rows it keeps or None)."""
        out = {}
        for i, layout in self.layouts.items():
            rows = sorted(kept[i])
            for key, (new, select) in self.adapter.expert_removal_keys(i, layout, self.by_layer[i], rows).items():
                out[key] = (new, rows if select else None)
        return out


class ModelTable(NamedTuple):
    """The model's state-dict names, from a skeleton on the meta device (no weights)."""

    roles: dict[str, str]   # parameter -> 'routed', 'router', 'shared' or 'dense' (``MoEAdapter.parameter_roles``)
    buffers: frozenset      # persistent buffers (saved, not parameters)
    aliases: frozenset      # tied parameters' second names (counted once, under ``roles``' name)

    def known(self, name: str) -> bool:
        return name in self.roles or name in self.buffers or name in self.aliases


def model_table(model_dir, trust_remote_code: bool = False) -> ModelTable:
    """``ModelTable`` of a checkpoint's model, built on the meta device from its config (no tensor is read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    roles = get_adapter(cfg).parameter_roles(model)
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return ModelTable(roles, frozenset(set(model.state_dict()) - every), frozenset(every - set(roles)))


def checkpoint_sizes(model_dir, table: ModelTable | None = None, trust_remote_code: bool = False) -> dict[str, int]:
    """The checkpoint's parameters (the keys that load into the model's parameters; buffers and keys the model
    does not have are not counted) and bytes of its indexed tensors, from the headers."""
    ck = Checkpoint(model_dir)
    table = table or model_table(model_dir, trust_remote_code)
    return {"parameters": sum(info.numel for k, (_, info) in ck.tensors.items() if ck.model_name(k) in table.roles),
            "tensor_bytes": sum(info.nbytes for _, info in ck.tensors.values())}


# -- one layer's mask or weight file, one expert's rows at a time ------------------------------------------------

class LayerFile:
    """A layer's canonical tensors ('gate_up' (E, 2I, H), 'down' (E, H, I), 'shared.*' (1, ...)) in a mask file
    (bit-packed, ``weights.masks``) or a file of updated weights, read one expert's rows at a time."""

    def __init__(self, path, packed: bool):
        self.path, self.packed = Path(path), packed
        self.reader = SafetensorsReader(path)
        if packed:
            self.shapes = {k: tuple(v) for k, v in json.loads(self.reader.metadata["shapes"]).items()}
        else:
            self.shapes = {k: info.shape for k, info in self.reader.tensors.items()}
        for k, s in self.shapes.items():
            if len(s) != 3:
                raise ValueError(f"{self.path}: {k} has shape {s}, a layer's canonical tensors are (experts, rows, cols)")

    def rows(self, name: str, expert: int, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of one expert, (hi - lo, cols): bool for masks, the file's dtype for weights."""
        _, r, c = self.shapes[name]
        start, count = (expert * r + lo) * c, (hi - lo) * c
        if not self.packed:
            return self.reader.read_range(name, start, count).reshape(hi - lo, c)
        first, last = start // 8, -(-(start + count) // 8)
        packed = self.reader.read_range(name, first, last - first)
        bits = np.unpackbits(packed.numpy(), bitorder="little")[start - 8 * first:start - 8 * first + count]
        return torch.from_numpy(bits.view(bool)).reshape(hi - lo, c)  # unpackbits gives 0 / 1 bytes

    def close(self) -> None:
        self.reader.close()


def _row_blocks(t: torch.Tensor) -> list[tuple[int, int]]:
    """Blocks of rows of ``t`` of about ``ROW_BLOCK`` elements, so that temporaries stay small."""
    step = max(1, ROW_BLOCK // max(1, t[0].numel())) if t.shape[0] else 1
    return [(a, min(a + step, t.shape[0])) for a in range(0, t.shape[0], step)]


def _row_range(part: Part, rows: int) -> tuple[int, int]:
    if part.half is None:
        return 0, rows
    return part.half * rows // 2, (part.half + 1) * rows // 2


def _check_layer_files(adapter, ck: Checkpoint, layer: int, f: LayerFile, what: str) -> None:
    """A layer's file covers its routed experts (and the shared experts, if it has theirs), in the checkpoint's
    shapes."""
    parts = {k: p for k, (i, p) in ck.parts.items() if i == layer}
    names = {p.name for p in parts.values()}
    for name in adapter.param_names:
        if name not in f.shapes:
            raise ValueError(f"{f.path}: {what} file has no {name!r}")
    for name, shape in f.shapes.items():
        if name not in names:
            raise ValueError(f"{f.path}: {what} {name!r} has no checkpoint keys in layer {layer}")
        if shape[0] != (1 if name.startswith(SHARED) else adapter.num_experts):
            raise ValueError(f"{f.path}: {what} {name!r} has shape {shape}, the checkpoint has "
                             f"{adapter.num_experts} experts")
    for key, part in parts.items():
        if part.name not in f.shapes:
            continue
        shape = f.shapes[part.name]
        stored = ck.tensors[key][1].shape
        if part.expert is None:
            want = tuple(adapter.part_tensor(part, torch.empty(shape, device="meta")).shape)
        else:
            lo, hi = _row_range(part, shape[1])
            want = (hi - lo, shape[2]) if part.expert < shape[0] else None
        if want != tuple(stored):
            raise ValueError(f"{what} {part.name} has shape {shape}, the checkpoint's {key} is {tuple(stored)}")


# -- the rewrite ----------------------------------------------------------------------------------------------

class _Out(NamedTuple):
    key: str                     # the output key
    source: str                  # the base key
    dtype: str
    shape: tuple[int, ...]
    rows: list[int] | None       # the base rows it keeps (expert removal)


@dataclass
class RewriteResult:
    path: Path                            # the written checkpoint directory
    weight_map: dict[str, str]            # output key -> its shard
    tensor_bytes: int                     # bytes of tensor data written
    sparsity: dict | None = None          # ``weights.sparsity.sparsity_report`` of the result (report=True)
    unmapped: list[str] = field(default_factory=list)  # keys the model has no name for (passed on unchanged)


def _copy_side_files(base: Path, out: Path, config: dict | None) -> None:
    if config is None:
        shutil.copyfile(base / "config.json", out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for pattern in COPIED:
        for f in sorted(base.glob(pattern)):
            if f.is_file() and f.name not in ("config.json", INDEX) and f.suffix != ".safetensors":
                shutil.copyfile(f, out / f.name)


class _Rewrite:
    def __init__(self, ck: Checkpoint, masks, weights, kept, nm, report, table):
        from ..weights.sparsity import SparsityTally

        self.ck, self.adapter, self.nm = ck, ck.adapter, nm
        self.table = table
        self.tally = SparsityTally(self.adapter) if report else None
        self.masks = {int(i): LayerFile(p, packed=True) for i, p in (masks or {}).items()}
        self.weights = {int(i): LayerFile(p, packed=False) for i, p in (weights or {}).items()}
        for files, what in ((self.masks, "mask"), (self.weights, "weights")):
            for i, f in files.items():
                if i not in ck.layouts:
                    raise ValueError(f"{f.path}: layer {i} is not an MoE layer of {ck.dir}")
                _check_layer_files(self.adapter, ck, i, f, what)
        self.removal = ck.removal(kept) if kept else {}
        self._readers: dict[str, SafetensorsReader] = {}

    def close(self) -> None:
        for f in list(self.masks.values()) + list(self.weights.values()) + list(self._readers.values()):
            f.close()

    def reader(self, fname: str) -> SafetensorsReader:
        if fname not in self._readers:
            for r in self._readers.values():  # the output walks the base's shards in order
                r.close()
            self._readers = {fname: SafetensorsReader(self.ck.dir / fname)}
        return self._readers[fname]

    def plan(self, max_shard_size: int) -> list[tuple[dict, list[_Out]]]:
        """The output shards: the base's shards in order, each split where it would exceed ``max_shard_size``."""
        shards = []
        for meta, tensors in self.ck.shards.values():
            cur, size = [], 0
            for key, info in tensors.items():
                new, rows = self.removal.get(key, (key, None))
                if new is None:
                    continue
                shape = info.shape if rows is None else (len(rows),) + tuple(info.shape[1:])
                nbytes = _numel(shape) * info.torch_dtype.itemsize
                if cur and size + nbytes > max_shard_size:
                    shards.append((meta, cur))
                    cur, size = [], 0
                cur.append(_Out(new, key, info.dtype, tuple(shape), rows))
                size += nbytes
            if cur:
                shards.append((meta, cur))
        keys = [o.key for _, outs in shards for o in outs]
        if len(set(keys)) != len(keys):
            raise ValueError("the rewrite would write a key twice")
        # widest elements first, so that every tensor starts at a multiple of its element size
        return [(meta, sorted(outs, key=lambda o: -DTYPES[o.dtype].itemsize)) for meta, outs in shards]

    # -- one tensor ------------------------------------------------------------------------------------------
    def _pruned(self, layer: int, part: Part) -> tuple[LayerFile | None, LayerFile | None]:
        mask, new = self.masks.get(layer), self.weights.get(layer)
        return (mask if mask and part.name in mask.shapes else None), (new if new and part.name in new.shapes else None)

    def _prune(self, layer: int, part: Part, t: torch.Tensor) -> None:
        """Updated weights, then the mask, into the key's tensor ``t`` (in place), one expert at a time (a fused
        key) or a block of rows at a time (a per-expert key); the N:M check and the routed experts' zeros on the
        result."""
        mask, new = self._pruned(layer, part)
        source = mask or new
        routed = self.tally is not None and not part.name.startswith(SHARED)
        for e in (range(t.shape[0]) if part.expert is None else [part.expert]):
            if part.expert is None:  # a fused key: expert e's slice, in the parameter's layout
                cut = lambda x: self.adapter.part_tensor(part, x[None])[0]  # noqa: E731
                whole = t[e]
                blocks = [(0, source.shapes[part.name][1], whole)] if source else []
            else:  # a per-expert key: rows [lo, hi) of expert e's canonical tensor, as they are
                cut, whole = (lambda x: x), t
                blocks = []
                if source:
                    lo, hi = _row_range(part, source.shapes[part.name][1])
                    step = max(1, ROW_BLOCK // t.shape[-1])
                    blocks = [(a, min(a + step, hi), t[a - lo:a - lo + step]) for a in range(lo, hi, step)]
            for a, b, view in blocks:
                if new is not None:
                    view.copy_(cut(new.rows(part.name, e, a, b)).to(t.dtype))
                if mask is not None:
                    raw = mask.rows(part.name, e, a, b)
                    m = cut(raw)
                    for x, y in _row_blocks(view):  # the bool factor is promoted to t's dtype: x * 1, x * 0
                        view[x:y].mul_(m[x:y])
                    if self.nm:
                        self._check_nm(part, view, raw)
            if routed:
                c = self.adapter.part_canonical(part, whole[None] if part.expert is None else whole)[0]
                self._count_expert(layer, part, e, c)

    def _check_nm(self, part: Part, view: torch.Tensor, mask: torch.Tensor) -> None:
        """``check_nm`` on a block of a key's tensor (canonical orientation), a few rows at a time."""
        from ..weights.sparsity import check_nm

        c = self.adapter.part_canonical(part, view[None] if part.expert is None else view)[0]
        for x, y in _row_blocks(c):
            check_nm(c[x:y], mask[x:y], *self.nm)

    def _count_expert(self, layer: int, part: Part, e: int, c: torch.Tensor) -> None:
        """Zeros of expert e's gate, up and down rows in the canonical chunk ``c`` (rows, cols) of a routed key."""
        from ..weights.sparsity import count_zeros

        if part.name == "down":
            pieces = [("down", c)]
        elif part.half is None:  # a fused key: the gate's rows, then the up projection's
            pieces = [("gate", c[:c.shape[0] // 2]), ("up", c[c.shape[0] // 2:])]
        else:
            pieces = [(("gate", "up")[part.half], c)]
        for which, x in pieces:
            self.tally.expert(layer, e, which, count_zeros(x), x.numel())

    def _role(self, key: str) -> str | None:
        if self.table is None:
            return None
        return self.table.roles.get(self.ck.model_name(key))

    def _count_other(self, key: str, zeros: int, numel: int) -> None:
        role = self._role(key)
        if role in ("shared", "router", "dense"):
            self.tally.parameter(role, zeros, numel)
        m = _LAYER.match(key)
        if m and self.ck.router_weight.get(int(m[1])) == key:
            self.tally.router(int(m[1]), zeros, numel)

    def write(self, writer: SafetensorsWriter, o: _Out) -> None:
        from ..weights.sparsity import count_zeros

        fname, info = self.ck.tensors[o.source]
        reader = self.reader(fname)
        layer, part = self.ck.parts.get(o.source, (None, None))
        if o.rows is not None:
            t = reader.read_rows(o.source, o.rows)
        elif part is not None and (any(self._pruned(layer, part))
                                   or (self.tally is not None and not part.name.startswith(SHARED))):
            t = reader.read(o.source)
            self._prune(layer, part, t)
        else:  # passed on as it is, in pieces
            counting = self.tally is not None and self._role(o.source) in ("shared", "router", "dense")
            zeros = 0

            def pieces():
                nonlocal zeros
                for c in reader.chunks(o.source):
                    if counting:
                        zeros += count_zeros(c.view(info.torch_dtype))
                    yield c

            writer.copy(o.key, pieces())
            if counting:
                self._count_other(o.source, zeros, info.numel)
            return
        if self.tally is not None and (part is None or part.name.startswith(SHARED)):
            self._count_other(o.source, count_zeros(t), t.numel())
        writer.write(o.key, t)


def rewrite_checkpoint(base_dir, out_dir, *, masks: dict[int, str | Path] | None = None,
                       weights: dict[int, str | Path] | None = None, kept: dict[int, list[int]] | None = None,
                       config: dict | None = None, nm: tuple[int, int] | None = None, report: bool = False,
                       max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, trust_remote_code: bool = False,
                       finish: Callable[[Path, RewriteResult], None] | None = None) -> RewriteResult:
    """Stream the base checkpoint tensor by tensor into ``out_dir``, changed as asked (a temporary sibling,
    renamed into place once everything, ``finish(tmp_dir, result)`` included, succeeded).

    masks, weights: {layer: mask file (``weights.masks.save_masks``) / updated weights (canonical tensors)}: each
        layer's expert weights (and its shared experts' where the files hold them) become the updated weights,
        cast to the stored dtype, times the mask, exactly as ``weights.assemble.prune_layer`` leaves a model.
    kept: {layer: original expert indices} to keep in every MoE layer (``MoEAdapter.expert_removal_keys``),
        with ``config`` the config.json to write (``experts.removal.reduced_config``); not with masks.
    nm: (N, M) to check on every masked matrix (``weights.sparsity.check_nm``).
    report: compute ``weights.sparsity.sparsity_report`` of the result as it streams (``result.sparsity``).
    """
    if kept and (masks or weights):
        raise ValueError("remove experts and prune weights in separate rewrites")
    if report and kept:
        raise ValueError("the sparsity report is computed for weight pruning, not expert removal")
    if kept and config is None:
        raise ValueError("expert removal needs the updated config")
    from ..atomic import atomic_dir

    ck = Checkpoint(base_dir)
    table = model_table(base_dir, trust_remote_code) if report else None
    job = _Rewrite(ck, masks, weights, kept, nm, report, table)
    try:
        shards = job.plan(max_shard_size)
        single = ck.single and len(shards) == 1
        n = len(shards)
        names = [SINGLE] if single else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        final = Path(out_dir)
        with atomic_dir(final) as tmp:
            wmap, total = {}, 0
            for name, (meta, outs) in zip(names, shards):
                writer = SafetensorsWriter(tmp / name, [(o.key, o.dtype, o.shape) for o in outs],
                                           meta or {"format": "pt"})
                try:
                    for o in outs:
                        job.write(writer, o)
                except BaseException:
                    writer.abort()
                    raise
                writer.close()
                for o in outs:
                    wmap[o.key] = name
                    total += _numel(o.shape) * DTYPES[o.dtype].itemsize
            if not single:
                meta = {k: v for k, v in ck.index_metadata.items() if k not in ("total_size", "total_parameters")}
                index = {"metadata": {**meta, "total_size": total}, "weight_map": dict(sorted(wmap.items()))}
                (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
            _copy_side_files(ck.dir, tmp, config)
            unmapped = [k for k in ck.tensors if table is not None and not table.known(ck.model_name(k))]
            result = RewriteResult(final, wmap, total, job.tally.report() if job.tally else None, unmapped)
            if finish is not None:
                finish(tmp, result)
        return result
    finally:
        job.close()


__all__ = ["Part", "Checkpoint", "ModelTable", "RewriteResult", "SafetensorsReader", "SafetensorsWriter",
           "LayerFile", "rewrite_checkpoint", "checkpoint_sizes", "model_table", "read_header", "read_metadata",
           "DEFAULT_MAX_SHARD_SIZE"]
