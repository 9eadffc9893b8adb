"""Safe loading, audited: no file a user can supply is unpickled, and no checkpoint code runs unless params turn
trust_remote_code on.

The static audit reads every Python file the workflow runs (the library, the scripts, the Snakefile and its
rules) for the calls that unpickle or that can run a checkpoint's code; the dynamic checks hand the loaders
booby-trapped files (a pickle that writes a marker file when unpickled, modelling code that writes one when
imported) and assert that the marker never appears.
"""
import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "pruning").rglob("*.py"), *(ROOT / "workflow/scripts").glob("*.py")])
RULES = sorted([ROOT / "Snakefile", *(ROOT / "workflow/rules").glob("*.smk")])
# The one unpickling in the workflow: pruning.distill.distributed hands its workers the job's arguments through
# a file it wrote itself into a fresh private temporary directory (never a path from params or a checkpoint).
ALLOWED_UNPICKLING = {("pruning/distill/distributed.py", "pickle.loads")}
UNPICKLING = {"pickle.load", "pickle.loads", "torch.load", "joblib.load", "dill.load", "dill.loads", "marshal.loads",
              "cloudpickle.load", "cloudpickle.loads", "pickle.Unpickler", "shelve.open", "numpy.load", "np.load",
              "pandas.read_pickle", "pd.read_pickle"}


def _dotted(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _calls(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, _dotted(node.func) or ""


def test_no_unpickling_outside_the_internal_job_file():
    found = set()
    for path in SOURCES:
        for node, name in _calls(path):
            if name in UNPICKLING or name.endswith((".read_pickle", "torch.load")):
                if name in ("numpy.load", "np.load") and not any(k.arg == "allow_pickle" for k in node.keywords):
                    continue  # numpy refuses pickles by default
                found.add((path.relative_to(ROOT).as_posix(), name))
            if name in ("yaml.load", "yaml.load_all") and not any(
                    _dotted(k.value) in ("yaml.SafeLoader", "yaml.CSafeLoader") for k in node.keywords):
                found.add((path.relative_to(ROOT).as_posix(), name))
    assert found == ALLOWED_UNPICKLING, found
    # and that one reads only the file written beside it, in the same module
    text = (ROOT / "pruning/distill/distributed.py").read_text()
    assert "pickle.dumps(job)" in text and "tempfile" in text


def test_remote_code_only_from_params():
    """Every loader that can run a checkpoint's code gets trust_remote_code from a variable (params), never a
    literal True; model weights are read with use_safetensors=True."""
    loaders = ("from_pretrained", "from_config", "AutoConfig", "load_dataset", "HFLM")
    checked = 0
    for path in SOURCES:
        for node, name in _calls(path):
            if not name.endswith(loaders):
                continue
            for k in node.keywords:
                if k.arg == "trust_remote_code":
                    checked += 1
                    assert not (isinstance(k.value, ast.Constant) and k.value.value is True), (path, node.lineno)
            if name.endswith("ForCausalLM.from_pretrained"):
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("use_safetensors"), ast.Constant) and kw["use_safetensors"].value is True, (
                    path, node.lineno)
    assert checked >= 3  # the model, config and table loaders pass it through
    for path in RULES:
        assert "trust_remote_code=True" not in path.read_text().replace(" ", "")
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert defaults["model"]["trust_remote_code"] is False


class _Trap:
    """Unpickling this writes ``marker``: proof that a loader executed a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


def _micro_checkpoint(tmp_path, seed=0):
    from tests.conftest import make_tiny_mixtral

    d = tmp_path / "model"
    make_tiny_mixtral(seed).save_pretrained(d)
    return d


def test_pickled_weights_are_never_loaded(tmp_path):
    """A checkpoint whose weights come only as a pickle (pytorch_model.bin) fails to load, and the pickle never
    runs; a pickle beside the safetensors is ignored."""
    from pruning.models.checkpoint import load_model

    d = _micro_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Trap(marker)}, f)
    load_model(d)  # safetensors present: the .bin is never opened
    assert not marker.exists()
    (d / "model.safetensors").unlink()
    with pytest.raises(Exception):
        load_model(d)
    assert not marker.exists()


def test_remote_code_is_refused_with_a_clear_line(tmp_path):
    """A checkpoint that brings its own modelling code (config.json auto_map): the workflow refuses it when it
    loads, says why, and the code never runs."""
    d = tmp_path / "custom"
    d.mkdir()
    marker = tmp_path / "ran"
    (d / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "config.json").write_text(json.dumps({
        "model_type": "custom_moe", "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_size": 16,
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomMoE"},
    }))
    params = yaml.safe_load((ROOT / "tests/micro_params.yaml").read_text())
    params["model"]["name_or_path"] = str(d)
    work = tmp_path / "work"
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--cores", "1", "-n"],
                       cwd=work, capture_output=True, text=True, timeout=300)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert r.returncode != 0 and len(lines) == 1, lines
    assert "remote" in lines[0] and "model.trust_remote_code: true" in lines[0] and "custom_moe" in lines[0], lines[0]
    assert not marker.exists() and sorted(p.name for p in work.iterdir()) == ["params.yaml"]
    # the library's own loaders refuse to run it too, whatever the adapter check says
    from transformers import AutoConfig

    with pytest.raises(Exception):
        AutoConfig.from_pretrained(str(d))  # trust_remote_code defaults to off
    assert not marker.exists()
