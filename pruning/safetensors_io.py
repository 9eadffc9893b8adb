"""safetensors files read and written one tensor at a time: the header alone (dtypes, shapes, offsets), any
tensor or part of one read with plain file reads into memory of its own, and files written header first, then
each tensor as it comes, so writing never holds more than the tensor being written (the safetensors library's
``save_file`` builds a bytes copy of every tensor first).

Files are laid out as the safetensors library lays them out (larger dtypes first, then by name; ``FILE_ORDER``)
with a canonical header (metadata keys sorted, compact JSON padded to 8 bytes), so the same tensors and metadata
give the same bytes whichever way they were written.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple

import torch

CHUNK_BYTES = 1 << 24  # tensors passed through unchanged are copied in pieces of this size
BIG_BUFFER = 1 << 20  # tensors read from this size up get memory of their own (``_buffer``)

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# the safetensors library's layout: dtypes in this order (its dtype enum, descending), names ascending within one
FILE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8",
              "U8", "BOOL")


class TensorInfo(NamedTuple):
    dtype: str               # the safetensors dtype name ('BF16', 'F32', ...)
    shape: tuple[int, ...]
    start: int               # the file offset of its first byte
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return _numel(self.shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 buffer; a large one is an anonymous memory map of its own, handed back to the
    system when the tensor goes (from the heap, freed tensors of varying sizes leave the process's resident
    size growing by fragments)."""
    if nbytes < BIG_BUFFER:
        return torch.empty(nbytes, dtype=torch.uint8)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


def read_header(path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """A safetensors file's metadata and its tensors (in file order), from the header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None) or {}
    items = sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0]))
    tensors = {}
    for key, v in items:
        if v["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {key} has dtype {v['dtype']}, which this reader does not know")
        a, b = v["data_offsets"]
        tensors[key] = TensorInfo(v["dtype"], tuple(v["shape"]), 8 + n + a, b - a)
    return meta, tensors


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


def check_file(path) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    """``read_header`` for a file not yet trusted: every problem a header can show, as one ``ValueError`` line
    naming the file (a header length past the end, a header that is not the JSON safetensors writes, a tensor
    whose dtype, shape and offsets disagree, tensor data past the end of the file: a truncated shard). Reads
    the header alone."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise ValueError(f"{path}: {size} bytes, shorter than a safetensors header (corrupt or truncated)")
        (n,) = struct.unpack("<Q", first)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise ValueError(f"{path}: header length {n} exceeds the file's {size} bytes (not safetensors, or truncated)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: the header is not valid JSON (corrupt safetensors header)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object (corrupt safetensors header)")
    meta = header.get("__metadata__", {})
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError(f"{path}: __metadata__ is not a mapping of strings (corrupt safetensors header)")
    end = 0
    for key, v in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(v, dict) and v.get("dtype") in DTYPES and isinstance(v.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in v["shape"]) and isinstance(v.get("data_offsets"), list)
              and len(v["data_offsets"]) == 2 and all(isinstance(o, int) for o in v["data_offsets"]))
        if not ok:
            raise ValueError(f"{path}: tensor {key} has no valid dtype, shape and data_offsets (corrupt safetensors header)")
        a, b = v["data_offsets"]
        if not 0 <= a <= b or b - a != _numel(v["shape"]) * DTYPES[v["dtype"]].itemsize:
            raise ValueError(f"{path}: tensor {key}'s data_offsets {[a, b]} do not fit its dtype {v['dtype']} and shape "
                             f"{v['shape']} (corrupt safetensors header)")
        end = max(end, b)
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: the header's tensors end at byte {8 + n + end}, the file has {size} bytes")
    return read_header(path)


def read_metadata(path) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (a mask file's layer, method, ...), no tensor read."""
    return read_header(path)[0]


class SafetensorsReader:
    """One safetensors file: its header, and any tensor (or a contiguous range of its elements, or some of its
    rows) read into memory of its own with plain file reads."""

    def __init__(self, path):
        self.path = Path(path)
        self.metadata, self.tensors = read_header(self.path)
        self._f = open(self.path, "rb", buffering=0)

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _readinto(self, offset: int, buf: torch.Tensor) -> None:
        view = memoryview(buf.numpy()).cast("B")
        self._f.seek(offset)
        done = 0
        while done < len(view):
            n = self._f.readinto(view[done:])
            if not n:
                raise EOFError(f"{self.path}: file ends inside a tensor")
            done += n

    def read(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        buf = _buffer(info.nbytes)
        self._readinto(info.start, buf)
        return buf.view(info.torch_dtype).reshape(info.shape)

    def read_range(self, key: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor, 1-D."""
        info = self.tensors[key]
        if start < 0 or start + count > info.numel:
            raise IndexError(f"{self.path}: {key} has {info.numel} elements, asked for [{start}, {start + count})")
        size = info.torch_dtype.itemsize
        buf = _buffer(count * size)
        self._readinto(info.start + start * size, buf)
        return buf.view(info.torch_dtype)

    def read_rows(self, key: str, rows: list[int]) -> torch.Tensor:
        """The tensor's rows ``rows`` (indices along dim 0, in that order): an index_select that reads only them."""
        info = self.tensors[key]
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        out = _buffer(len(rows) * row)
        j = 0
        while j < len(rows):  # runs of consecutive rows in one read each
            k = j + 1
            while k < len(rows) and rows[k] == rows[k - 1] + 1:
                k += 1
            if rows[j] < 0 or rows[k - 1] >= info.shape[0]:
                raise IndexError(f"{self.path}: {key} has {info.shape[0]} rows, asked for {rows[j]}..{rows[k - 1]}")
            self._readinto(info.start + rows[j] * row, out[j * row:k * row])
            j = k
        return out.view(info.torch_dtype).reshape((len(rows),) + tuple(info.shape[1:]))

    def chunks(self, key: str, size: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """The tensor's bytes in pieces of at most ``size`` (a multiple of its element size), as uint8 tensors."""
        info = self.tensors[key]
        size = max(1, size // 8) * 8
        for a in range(0, info.nbytes, size):
            buf = _buffer(min(size, info.nbytes - a))
            self._readinto(info.start + a, buf)
            yield buf


class SafetensorsWriter:
    """Writes one safetensors file a tensor at a time: the header (every tensor's dtype, shape and offsets,
    padded to 8 bytes) on opening, then each tensor's bytes, in the order given, by ``write`` or ``copy``."""

    def __init__(self, path, tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._pending: list[tuple[str, str, tuple, int]] = []
        offset = 0
        for key, dtype, shape in tensors:
            if key in header:
                raise ValueError(f"tensor {key} written twice")
            nbytes = _numel(shape) * DTYPES[dtype].itemsize
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._pending.append((key, dtype, tuple(shape), nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def _expect(self, key: str) -> tuple[str, str, tuple, int]:
        if self._next >= len(self._pending) or self._pending[self._next][0] != key:
            want = self._pending[self._next][0] if self._next < len(self._pending) else "nothing"
            raise ValueError(f"{self.path}: writing {key}, the header says {want} comes next")
        self._next += 1
        return self._pending[self._next - 1]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        _, dtype, shape, nbytes = self._expect(key)
        if tensor.dtype != DTYPES[dtype] or tuple(tensor.shape) != shape:
            raise ValueError(f"{key}: {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        self._f.write(memoryview(data.numpy()))

    def copy(self, key: str, chunks: Iterable[torch.Tensor]) -> None:
        """The tensor's bytes as they come (uint8 pieces, e.g. ``SafetensorsReader.chunks``)."""
        _, _, _, nbytes = self._expect(key)
        done = 0
        for c in chunks:
            self._f.write(memoryview(c.contiguous().numpy()))
            done += c.numel()
        if done != nbytes:
            raise ValueError(f"{key}: {done} bytes written, the header says {nbytes}")

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._pending):
            raise ValueError(f"{self.path}: {len(self._pending) - self._next} tensors of the header not written")

    def abort(self) -> None:
        """Close an unfinished file (its directory is being thrown away)."""
        self._f.close()


def file_order(dtypes: Mapping[str, str]) -> list[str]:
    """Tensor names (``{name: safetensors dtype}``) in the order the file lays them out."""
    return sorted(dtypes, key=lambda k: (FILE_ORDER.index(dtypes[k]), k))


def _fetched(t: torch.Tensor) -> torch.Tensor:
    """A tensor's full value on the CPU; a DTensor (a sharded parameter or moment) gathered first."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def write_file(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
               write: bool = True) -> None:
    """``tensors`` as one safetensors file at ``path``, written in file order one tensor at a time, each fetched
    when its turn comes: a DTensor is gathered then (``full_tensor``, a collective), anything else copied to the
    CPU. With ``write`` False nothing is written, but every tensor is fetched in the same order: the other
    processes of a sharded model take part in the gathers while one writes. Metadata keys are sorted; none (or
    an empty mapping) writes no ``__metadata__``."""
    dtypes = {k: DTYPE_NAMES[t.dtype] for k, t in tensors.items()}
    order = file_order(dtypes)
    writer = None
    if write:
        meta = {str(k): str(v) for k, v in sorted((metadata or {}).items())}
        writer = SafetensorsWriter(path, [(k, dtypes[k], tuple(tensors[k].shape)) for k in order], meta)
    try:
        for k in order:
            t = _fetched(tensors[k])
            if writer is not None:
                writer.write(k, t)
            del t
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
