"""The bad-input catalogue beyond params values (tests/test_params.py holds those): data sources, lm-eval task
names and model directories fail at workflow load with one line naming the key and what is allowed, before any
job runs, and nothing is written (``LOAD_CASES``, through ``snakemake -n``); what only a job can see (token
counts, tensor data behind an intact header, tampered masks and statistics) fails there with one line naming the
file, and the job's input files stay as they were (``JOB_CASES``, through the check the job's script calls).

Catalogue size: len(test_params.CASES) + len(LOAD_CASES) + len(JOB_CASES) (``test_catalogue_size``)."""
import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MICRO = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1"]
ALLOWED_DATA = "allowed: builtin, builtin:<package> (a standard-library package), c4, wikitext2, or a local .txt/.jsonl file"
ALLOWED_CKPT = "allowed: a complete safetensors checkpoint"
PROFILE_NOTE = "Using workflow specific profile"  # Snakemake's own note when profiles/default exists, before loading


def _with(**changes):
    """Micro params with dotted keys set (``calib.source="x"``)."""
    p = yaml.safe_load(yaml.safe_dump(MICRO))
    for path, value in changes.items():
        node, keys = p, path.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return p


def _file(t: Path, name: str, data) -> str:
    (t / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return name  # relative: the workflow runs in t


# -- model directories -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    """A tiny Mixtral (4 experts, top-2: the micro params' expert counts fit it) as one file and as two shards."""
    global CKPTS
    from transformers import AutoModelForCausalLM, MixtralConfig

    d = tmp_path_factory.mktemp("ckpt")
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(d / "single")
    model.save_pretrained(d / "sharded", max_shard_size="20KB")
    CKPTS = d
    return d


CKPTS = None  # where moe_checkpoints saved them


def _model(t: Path, kind: str = "single") -> Path:
    src = CKPTS / kind
    dst = t / "model"
    shutil.copytree(src, dst)
    return dst


def _header_len(f: Path) -> int:
    return struct.unpack("<Q", f.read_bytes()[:8])[0]


def _rewrite_header(f: Path, edit) -> None:
    """Replace the header JSON of a safetensors file by ``edit(header)`` (same length, padded with spaces)."""
    raw = f.read_bytes()
    n = _header_len(f)
    header = json.loads(raw[8:8 + n])
    blob = json.dumps(edit(header), separators=(",", ":")).encode()
    assert len(blob) <= n
    f.write_bytes(raw[:8] + blob + b" " * (n - len(blob)) + raw[8 + n:])


def _corrupt_json(t):
    d = _model(t)
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:24] = b"\x00garbage{{{{{{{{"
    f.write_bytes(bytes(raw))
    return str(d)


def _header_past_end(t):
    d = _model(t)
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 40) + f.read_bytes()[8:])
    return str(d)


def _truncated(t):
    d = _model(t)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return str(d)


def _offsets_not_fitting(t):
    d = _model(t)

    def edit(h):
        key = next(k for k in h if k != "__metadata__")
        h[key]["shape"] = [s + 1 for s in h[key]["shape"]]
        return h

    _rewrite_header(d / "model.safetensors", edit)
    return str(d)


def _missing_shard(t):
    d = _model(t, "sharded")
    (d / "model-00002-of-00002.safetensors").unlink()
    return str(d)


def _index_key_missing(t):
    d = _model(t, "sharded")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    key = next(k for k, f in idx["weight_map"].items() if f.startswith("model-00001"))
    idx["weight_map"][key] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return str(d)


def _index_not_json(t):
    d = _model(t, "sharded")
    (d / "model.safetensors.index.json").write_text("{not json")
    return str(d)


def _bin_only(t):
    from safetensors.torch import load_file

    d = _model(t)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return str(d)


# -- the load-time catalogue: (params maker, the line's start, what it must say) ---------------------------------

LOAD_CASES = {
    # calibration and evaluation data
    "calib: no such file": (lambda t: _with(**{"calib.source": "data/calib.txt"}), "calib.source:", "neither a data set name nor an existing file; " + ALLOWED_DATA),
    "calib: wikitext": (lambda t: _with(**{"calib.source": "wikitext"}), "calib.source:", "(did you mean 'wikitext2'?); " + ALLOWED_DATA),
    "calib: c44": (lambda t: _with(**{"calib.source": "c44"}), "calib.source:", "(did you mean 'c4'?); " + ALLOWED_DATA),
    "calib: unknown package": (lambda t: _with(**{"calib.source": "builtin:no_such_pkg"}), "calib.source:", "names no standard-library package; " + ALLOWED_DATA),
    "calib: a directory": (lambda t: _with(**{"calib.source": "."}), "calib.source:", "is not a file; " + ALLOWED_DATA),
    "calib: empty file": (lambda t: _with(**{"calib.source": _file(t, "c.txt", b"")}), "calib.source: c.txt", "is empty; " + ALLOWED_DATA),
    "calib: shorter than a sample": (lambda t: _with(**{"calib.source": _file(t, "c.txt", "def f(): pass\n")}), "calib.source: c.txt",
                                     "14 bytes of text, fewer than one sample of calib.seqlen=32 tokens needs; allowed: a text longer than one sample"),
    "calib: binary": (lambda t: _with(**{"calib.source": _file(t, "c.txt", bytes(range(256)) * 4)}), "calib.source: c.txt", "is not text (binary"),
    "calib: not UTF-8": (lambda t: _with(**{"calib.source": _file(t, "c.txt", "caf\xe9 au lait ".encode("latin-1") * 20)}), "calib.source: c.txt",
                         "is not UTF-8 text (invalid byte at offset 3); " + ALLOWED_DATA),
    "calib: JSONL without text": (lambda t: _with(**{"calib.source": _file(t, "c.jsonl", '{"text": "' + "x" * 80 + '"}\n{"content": "y"}\n')}),
                                  "calib.source: c.jsonl", 'line 2 has no "text" string; allowed: JSONL with a "text" string per line'),
    "calib: JSONL not JSON": (lambda t: _with(**{"calib.source": _file(t, "c.jsonl", "just some text\n" * 10)}), "calib.source: c.jsonl",
                              'line 1 is not JSON; allowed: JSONL with a "text" string per line'),
    "eval: wikitext": (lambda t: _with(**{"eval.dataset": "wikitext"}), "eval.dataset:", "(did you mean 'wikitext2'?); " + ALLOWED_DATA),
    "eval: shorter than a window": (lambda t: _with(**{"eval.dataset": _file(t, "e.txt", "x = 1\n" * 4)}), "eval.dataset: e.txt",
                                    "24 bytes of text, fewer than one sample of eval.seqlen=32 tokens needs"),
    "task: misspelled package": (lambda t: _with(**{"experts.task.source": "builtin:asyncoi"}), "experts.task.source:",
                                 "(did you mean 'builtin:asyncio'?); " + ALLOWED_DATA),
    "task: eval file missing": (lambda t: _with(**{"experts.task.source": _file(t, "task.txt", "import os\n" * 20), "experts.task.eval": "task_test.txt"}),
                                "experts.task.eval:", "'task_test.txt' is neither a data set name nor an existing file; " + ALLOWED_DATA),
    "task: JSONL of blank lines": (lambda t: _with(**{"experts.task.source": _file(t, "task.jsonl", "\n\n\n"), "experts.task.eval": "builtin"}),
                                   "experts.task.source: task.jsonl", 'holds no documents; allowed: JSONL with a "text" string per line'),
    "distill: misspelled source": (lambda t: _with(**{"distill.source": "wikitext-2"}), "distill.source:", "(did you mean 'wikitext2'?); " + ALLOWED_DATA),
    # lm-eval task names
    "lm_eval: unknown task": (lambda t: _with(**{"lm_eval.tasks": ["code_next_line", "hellaswagg"]}), "lm_eval.tasks[1]:",
                              "'hellaswagg' is not an lm-eval task (did you mean 'hellaswag'?); allowed: code_next_line, code_rolling (local), or a task, group or tag of lm-eval"),
    # model directories
    "model: corrupt header": (lambda t: _with(**{"model.name_or_path": _corrupt_json(t)}), "model.name_or_path:",
                              "model.safetensors: the header is not valid JSON (corrupt safetensors header); " + ALLOWED_CKPT),
    "model: header length past the end": (lambda t: _with(**{"model.name_or_path": _header_past_end(t)}), "model.name_or_path:",
                                          "header length 1099511627776 exceeds the file's"),
    "model: truncated shard": (lambda t: _with(**{"model.name_or_path": _truncated(t)}), "model.name_or_path:",
                               "model.safetensors: truncated: the header's tensors end at byte"),
    "model: offsets do not fit the shape": (lambda t: _with(**{"model.name_or_path": _offsets_not_fitting(t)}), "model.name_or_path:",
                                            "do not fit its dtype F32 and shape"),
    "model: index names a missing shard": (lambda t: _with(**{"model.name_or_path": _missing_shard(t)}), "model.name_or_path:",
                                           "model.safetensors.index.json names model-00002-of-00002.safetensors, which is missing from"),
    "model: index lists a key the shard lacks": (lambda t: _with(**{"model.name_or_path": _index_key_missing(t)}), "model.name_or_path:",
                                                 "model-00002-of-00002.safetensors, which lacks it (1 such keys); " + ALLOWED_CKPT),
    "model: index not JSON": (lambda t: _with(**{"model.name_or_path": _index_not_json(t)}), "model.name_or_path:",
                              "model.safetensors.index.json is not a safetensors index with a weight_map; " + ALLOWED_CKPT),
    "model: PyTorch .bin only": (lambda t: _with(**{"model.name_or_path": _bin_only(t)}), "model.name_or_path:",
                                 "has only PyTorch weights (pytorch_model.bin); " + ALLOWED_CKPT),
}


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*"))}


# run through `snakemake -n` (one per kind of check; a few seconds each): the rest call the same checks in-process
END_TO_END = {"calib: not UTF-8", "eval: shorter than a window", "task: misspelled package", "lm_eval: unknown task",
              "model: truncated shard", "model: index names a missing shard"}
SCHEMA = ROOT / "workflow/schemas/params.schema.yaml"


def _load_line(tmp_path: Path, params: dict, end_to_end: bool) -> list[str]:
    """The non-empty lines loading the workflow with ``params`` prints: Snakemake's own, or (in-process) the line
    config.smk prints for the ``ParamsError`` of ``pruning.params.check_params``, which is what it calls."""
    if end_to_end:
        r = subprocess.run(SNAKEMAKE + ["-n"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0
        return [line for line in (r.stdout + r.stderr).splitlines() if line.strip() and not line.startswith(PROFILE_NOTE)]
    from snakemake.utils import validate

    from pruning.params import ParamsError, check_params

    with pytest.raises(ParamsError) as exc:
        check_params(params, SCHEMA, fill_defaults=lambda c: validate(c, str(SCHEMA)))
    return [f"params.yaml: {exc.value}"]


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_bad_input_fails_at_load_with_one_line(tmp_path, monkeypatch, moe_checkpoints, case):
    monkeypatch.chdir(tmp_path)  # the workflow's working directory: relative data paths resolve here
    make, start, says = LOAD_CASES[case]
    params = make(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    before = _tree(tmp_path)
    lines = _load_line(tmp_path, params, case in END_TO_END)
    assert len(lines) == 1, lines
    assert lines[0].startswith("params.yaml: " + start) and says in lines[0], lines[0]
    assert "\n" not in lines[0]
    assert _tree(tmp_path) == before  # nothing written, nothing changed


def test_valid_external_model_and_local_sources_dry_run(tmp_path, moe_checkpoints):
    """The catalogue's good twin: an intact sharded checkpoint, local text and JSONL sources pass."""
    assert END_TO_END <= set(LOAD_CASES)
    text = "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(40))
    params = _with(**{"model.name_or_path": str(_model(tmp_path, "sharded")), "calib.source": _file(tmp_path, "c.txt", text),
                      "eval.dataset": _file(tmp_path, "e.jsonl", json.dumps({"text": text}) + "\n"),
                      "experts.task.source": "builtin:asyncio", "experts.task.eval": "e.jsonl"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run(SNAKEMAKE + ["-n"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


# -- what only a job sees: the check its script calls, one line naming the file, inputs untouched ----------------

class ByteTokenizer:
    """One token per UTF-8 byte, EOS 256: the most tokens any byte-level tokenizer makes of a text."""
    eos_token_id = 256

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(t.encode()) for t in texts]}


def _experts(e=4, h=8, i=12, seed=0):
    from pruning.moe import Experts

    g = torch.Generator().manual_seed(seed)
    return Experts(torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g), torch.nn.functional.silu)


def _stats(path, experts, layer=0):
    from pruning.atomic import save_safetensors
    from pruning.calib.stats import LayerStats

    st = LayerStats(experts.num_experts, experts.gate_up.shape[-1], experts.intermediate_size)
    x = torch.rand(5, experts.gate_up.shape[-1])
    for e in range(experts.num_experts):
        st.add_expert(e, x, torch.rand(5), torch.rand(5, experts.intermediate_size))
    save_safetensors(path, st.finalize(), {"layer": layer, "propagation": "dense"})
    return path


def _mask(path, experts, stats_path, layer=0):
    from pruning.weights.masks import full_masks, mask_metadata, save_masks
    from pruning.weights.pattern import Pattern

    meta = mask_metadata("wanda", Pattern.parse("2:4"), "dense", layer, stats_path, {"fallback_experts": []})
    save_masks(path, full_masks(experts), meta)
    return path


def _calib_pass(t: Path, experts, layer=0):
    """A layer's dense calibration files as the pipeline names them, and a wanda mask computed from them."""
    from pruning.atomic import save_safetensors

    d = t / "calib/dense"
    d.mkdir(parents=True)
    stats = _stats(d / f"layer_{layer}.stats.safetensors", experts, layer)
    inputs = d / f"layer_{layer}.inputs.safetensors"
    save_safetensors(inputs, {"hidden_states": torch.randn(10, experts.gate_up.shape[-1])}, {"layer": layer})
    (t / "masks").mkdir()
    return stats, inputs, _mask(t / f"masks/layer_{layer}.safetensors", experts, stats, layer)


def _job_calib_short_in_tokens(t):
    """Passes the load-time byte bound (31 bytes + 2 >= 33) but makes 32 tokens, not the 33 a sample needs."""
    from pruning.data.sources import calibration_tokens

    f = _file(t, "c.txt", "x" * 31)
    return [t / f], lambda: calibration_tokens(ByteTokenizer(), f, 4, 32, 0)


def _job_eval_short_in_tokens(t):
    from pruning.data.sources import eval_windows

    f = _file(t, "e.txt", "x" * 30)
    return [t / f], lambda: eval_windows(ByteTokenizer(), f, "test", 32)


def _job_jsonl_bad_line_late(t):
    """A JSONL line the load-time check never read (past its first CHECK_BYTES) lacks "text"."""
    from pruning.data.sources import docs

    f = _file(t, "c.jsonl", json.dumps({"text": "x" * 50}) + "\n" + json.dumps({"body": "y"}) + "\n")
    return [t / f], lambda: docs(f, "train")


def _checkpoint(t: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    d = t / "model"
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    return d


def _job_nan_tensor(t):
    """Tensor data corrupt behind an intact header: NaN in an expert weight."""
    from pruning.models.checkpoint import read_tensors

    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    d = _checkpoint(t, {"experts.w": w, "router.w": torch.randn(4, 4)})
    return [d / "model.safetensors"], lambda: read_tensors(d, ["router.w", "experts.w"])


def _job_shard_truncated_after_load(t):
    from pruning.models.checkpoint import read_tensors

    d = _checkpoint(t, {"experts.w": torch.randn(64, 64)})
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])
    return [f], lambda: read_tensors(d, ["experts.w"])


def _job_mask_wrong_shape(t):
    """A mask file of another model (hidden size 16) where this model's layer has hidden size 8."""
    from pruning.weights.masks import check_layer_masks, load_masks

    experts = _experts()
    stats, inputs, _ = _calib_pass(t, experts)
    mask = _mask(t / "masks/layer_0.safetensors", _experts(h=16), stats)

    def job():
        masks, meta = load_masks(mask)
        check_layer_masks(mask, masks, meta, experts, inputs)
    return [stats, inputs, mask], job


def _job_mask_packed_bytes_tampered(t):
    """The mask's 'shapes' metadata no longer matches its packed bits."""
    from pruning.weights.masks import load_masks

    experts = _experts()
    _, _, mask = _calib_pass(t, experts)

    def edit(h):
        shapes = json.loads(h["__metadata__"]["shapes"])
        shapes["down"] = [4, 8, 10]
        h["__metadata__"]["shapes"] = json.dumps(shapes, separators=(",", ":"))
        return h

    _rewrite_header(mask, edit)
    return [mask], lambda: load_masks(mask)


def _job_stats_changed_after_mask(t):
    """The statistics were recomputed after the mask was made: their sha256 is not the mask's stats_sha256."""
    from pruning.weights.masks import check_layer_masks, load_masks

    experts = _experts()
    stats, inputs, mask = _calib_pass(t, experts)
    _stats(stats, experts)  # other calibration tokens

    def job():
        masks, meta = load_masks(mask)
        check_layer_masks(mask, masks, meta, experts, inputs)
    return [stats, inputs, mask], job


def _job_stats_of_another_model(t):
    from pruning.calib.stats import load_layer_stats

    stats = _stats(t / "layer_0.stats.safetensors", _experts(e=8))
    return [stats], lambda: load_layer_stats(stats, 0, _experts())


def _job_stats_of_another_layer(t):
    from pruning.calib.stats import load_layer_stats

    stats = _stats(t / "layer_1.stats.safetensors", _experts(), layer=1)
    return [stats], lambda: load_layer_stats(stats, 0, _experts())


def _job_inputs_given_as_mask(t):
    """apply's check: a file that is no mask file (the layer's MoE-block inputs) where a mask is expected."""
    from pruning.weights.masks import check_mask_file

    _, inputs, _ = _calib_pass(t, _experts())
    return [inputs], lambda: check_mask_file(inputs)


# case -> (setup returning (the job's input files, the job-side call), the file the line names, what it says)
JOB_CASES = {
    "calib: fewer tokens than a sample": (_job_calib_short_in_tokens, "c.txt", "32 tokens, fewer than one sample needs (33 tokens for seqlen=32)"),
    "eval: fewer tokens than a window": (_job_eval_short_in_tokens, "e.txt", "31 tokens, fewer than one sample needs (32 tokens for seqlen=32)"),
    "data: JSONL line without text past the checked part": (_job_jsonl_bad_line_late, "c.jsonl", 'not JSONL with a "text" string on every line'),
    "model: NaN in a tensor": (_job_nan_tensor, "model.safetensors", "tensor experts.w holds NaN or Inf values; the checkpoint is corrupt"),
    "model: shard truncated after load": (_job_shard_truncated_after_load, "model.safetensors", "the checkpoint is corrupt or truncated"),
    "mask: wrong shape": (_job_mask_wrong_shape, "layer_0.safetensors", "mask 'gate_up' has shape (4, 24, 16), the model's layer has (4, 24, 8)"),
    "mask: packed bits do not fit its shapes": (_job_mask_packed_bytes_tampered, "layer_0.safetensors", "mask 'down' holds 48 packed bytes, its shape [4, 8, 10] needs 40"),
    "mask: statistics changed after it was made": (_job_stats_changed_after_mask, "layer_0.safetensors", "layer_0.stats.safetensors now has"),
    "stats: of another model": (_job_stats_of_another_model, "layer_0.stats.safetensors", "count has shape (8,), layer 0 of this model needs (4,)"),
    "stats: of another layer": (_job_stats_of_another_layer, "layer_1.stats.safetensors", "statistics of layer 1, this job's layer is 0"),
    "mask: not a mask file": (_job_inputs_given_as_mask, "layer_0.inputs.safetensors", "not a mask file (no valid 'shapes' and 'layer' metadata)"),
}


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_bad_artifact_fails_in_the_job_with_one_line(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)  # relative data paths, as the workflow's jobs see them
    setup, names, says = JOB_CASES[case]
    inputs, job = setup(tmp_path)
    before = {str(f): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in inputs}
    with pytest.raises(ValueError) as exc:
        job()
    msg = str(exc.value)
    assert "\n" not in msg and names in msg and says in msg, msg
    assert {str(f): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in inputs} == before  # inputs kept


def test_job_checks_pass_on_the_pipelines_own_files(tmp_path):
    """The job-side checks accept what the pipeline writes: a mask with its statistics and experts."""
    from pruning.calib.stats import load_layer_stats
    from pruning.weights.masks import check_layer_masks, check_mask_file, load_masks

    experts = _experts()
    stats, inputs, mask = _calib_pass(tmp_path, experts)
    assert set(load_layer_stats(stats, 0, experts)) >= {"count", "gate_up.sum_x2", "down.sum_gx2"}
    masks, meta = load_masks(mask)
    assert check_mask_file(mask) == meta
    check_layer_masks(mask, masks, meta, experts, inputs)


def test_catalogue_size():
    """At least 40 bad inputs, each with its one-line message: params (test_params.CASES), load-time data, lm-eval
    and model directories (LOAD_CASES), and what only a job sees (JOB_CASES)."""
    from test_params import CASES

    sizes = {"params.yaml values and models": len(CASES), "load time": len(LOAD_CASES), "job time": len(JOB_CASES)}
    assert sum(sizes.values()) >= 40, sizes
