import math

import pytest
import torch

from pruning.weights.pattern import Pattern
from pruning.weights.masks import load_masks, nm_mask, pack, save_masks, select_mask, unpack, unstructured_mask


@pytest.mark.parametrize("shape", [(8, 16), (5, 13), (3, 7), (1, 9)])
@pytest.mark.parametrize("s", [0.1, 0.5, 0.7, 0.99])
def test_unstructured_rows_have_exact_zero_count(shape, s):
    scores = torch.randn(shape)
    mask = unstructured_mask(scores, s)
    assert ((~mask).sum(1) == math.floor(s * shape[1])).all()
    # the pruned entries of each row are exactly its lowest scores
    for r in range(shape[0]):
        pruned, kept = scores[r][~mask[r]], scores[r][mask[r]]
        if pruned.numel() and kept.numel():
            assert pruned.max() <= kept.min()


def test_unstructured_hand_example_and_ties():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    mask = unstructured_mask(scores, 0.5)
    assert mask.tolist() == [[True, False, True, False], [False, False, True, True]]  # ties: lower index pruned


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_groups_have_exactly_n_zeros(n, m):
    scores = torch.randn(6, 4 * m)
    mask = nm_mask(scores, n, m)
    assert ((~mask).reshape(6, -1, m).sum(-1) == n).all()


def test_nm_hand_example():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.2, 0.3, 0.4]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]


def test_nm_requires_divisible_columns():
    with pytest.raises(ValueError):
        nm_mask(torch.randn(2, 6), 2, 4)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1, "4:4", "5:4", "0:4"])
def test_pattern_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        Pattern.parse(bad)


def test_select_mask_dispatch():
    s = torch.randn(4, 8)
    assert torch.equal(select_mask(s, Pattern.parse("2:4")), nm_mask(s, 2, 4))
    assert torch.equal(select_mask(s, Pattern.parse(0.25)), unstructured_mask(s, 0.25))


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 11), (4, 8)])
def test_pack_roundtrip_odd_sizes(shape):
    mask = torch.rand(shape) > 0.5
    packed = pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpack(packed, shape), mask)


def test_mask_file_roundtrip(tmp_path):
    masks = {"gate_up": torch.rand(3, 10, 5) > 0.3, "down": torch.rand(3, 5, 5) > 0.6}
    save_masks(tmp_path / "m.safetensors", masks, {"method": "wanda", "layer": 1})
    back, meta = load_masks(tmp_path / "m.safetensors")
    assert meta["method"] == "wanda" and meta["layer"] == "1"
    for k in masks:
        assert torch.equal(back[k], masks[k])
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


def test_safetensors_bytes_are_canonical_across_processes(tmp_path):
    """The same tensors and metadata give byte-identical files in different processes (hash-map order)."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from pruning.atomic import save_safetensors; "
        "save_safetensors(sys.argv[1], {'w': torch.arange(6.).reshape(2, 3), 'b': torch.ones(3, dtype=torch.uint8)}, "
        "{f'k{i}': str(i) for i in range(12)})"
    )
    files = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        assert f.metadata() == {f"k{i}": str(i) for i in range(12)}
        assert f.get_tensor("w").tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("metadata", [None, {}])
def test_safetensors_without_metadata(tmp_path, metadata):
    """No metadata, or an empty dict: a valid file with the tensors and no metadata, the same bytes either way."""
    from safetensors import safe_open

    from pruning.atomic import save_safetensors

    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"b": torch.ones(2), "a": torch.zeros(3)}, metadata)
    with safe_open(str(path), framework="pt") as f:
        assert not f.metadata() and sorted(f.keys()) == ["a", "b"] and f.get_tensor("b").tolist() == [1.0, 1.0]
    save_safetensors(tmp_path / "u.safetensors", {"b": torch.ones(2), "a": torch.zeros(3)})
    assert path.read_bytes() == (tmp_path / "u.safetensors").read_bytes()


@pytest.mark.parametrize("metadata", [None, {"z": "1", "a": "two", "m": "[3]"}])
def test_streamed_safetensors_equal_the_librarys_file(tmp_path, metadata):
    """save_safetensors writes one tensor at a time; its bytes equal the safetensors library's own ``save_file``
    of the same tensors (its layout: by dtype, then name) once the header's metadata keys are sorted, for every
    dtype the readers know, empty, scalar and non-contiguous tensors, and the library reads it back."""
    import json
    import struct

    from safetensors import safe_open
    from safetensors.torch import save_file

    from pruning.atomic import save_safetensors
    from pruning.safetensors_io import DTYPES

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (name, dtype) in enumerate(sorted(DTYPES.items())):
        raw = torch.randint(0, 2 if dtype == torch.bool else 256, (3 + i, 8), generator=g, dtype=torch.uint8)
        tensors[f"t{(7 * i) % 15:02d}_{name}"] = raw.view(dtype)  # names not in dtype order
    tensors["bool"] = torch.rand(4, 3, generator=g) > 0.5
    tensors["empty"] = torch.zeros(0, 3)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    tensors["strided"] = torch.arange(12.0).reshape(3, 4).T  # non-contiguous
    ours = tmp_path / "ours.safetensors"
    save_safetensors(ours, tensors, metadata)

    lib = tmp_path / "lib.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(lib), metadata=metadata)
    raw = lib.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    canonical = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    canonical.update(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]))
    blob = json.dumps(canonical, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    assert ours.read_bytes() == struct.pack("<Q", len(blob)) + blob + raw[8 + n:]
    with safe_open(str(ours), framework="pt") as f:
        for k, v in tensors.items():
            back = f.get_tensor(k)
            assert back.dtype == v.dtype and back.shape == v.shape
            assert torch.equal(back.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
