"""pruning.import_closure on a hand-built package: which files a script runs, read from the source."""
from pathlib import Path

from pruning.import_closure import import_closure

ROOT = Path(__file__).resolve().parents[1]


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_closure_of_a_hand_built_package(tmp_path):
    _write(tmp_path, {
        "lib/__init__.py": "",
        "lib/a.py": "from .b import f\nimport os\n",                  # relative, plus a stdlib import
        "lib/b.py": "def f():\n    from lib.sub import deep\n",    # a lazy import inside a function still runs
        "lib/sub/__init__.py": "from . import helper\n",           # a package's __init__ runs first
        "lib/sub/deep.py": "from ..c import g\n",                  # two levels up
        "lib/sub/helper.py": "",
        "lib/c.py": "",
        "lib/unused.py": "import lib.a\n",                         # nobody imports it
        "lib/other/__init__.py": "",
        "lib/other/mod.py": "",
        "script.py": "import numpy\nfrom lib import a\nfrom lib.other import mod as m\n",
    })
    got = {p.relative_to(tmp_path).as_posix() for p in import_closure(tmp_path / "script.py", tmp_path / "lib")}
    assert got == {"lib/__init__.py", "lib/a.py", "lib/b.py", "lib/sub/__init__.py", "lib/sub/deep.py",
                   "lib/sub/helper.py", "lib/c.py", "lib/other/__init__.py", "lib/other/mod.py"}


def test_cycles_and_missing_names_end(tmp_path):
    _write(tmp_path, {
        "lib/__init__.py": "from lib import x\n",
        "lib/x.py": "from lib import y, not_a_module\n",
        "lib/y.py": "import lib.x\n",
        "script.py": "import lib.y\n",
    })
    got = {p.name for p in import_closure(tmp_path / "script.py", tmp_path / "lib")}
    assert got == {"__init__.py", "x.py", "y.py"}


def test_score_mask_jobs_do_not_depend_on_sparsegpt():
    """The split the issue asks for: the SparseGPT module is code of the SparseGPT mask jobs, not of the score
    methods' (a comment in it must not rerun a magnitude mask)."""
    def rel(script):
        return {p.relative_to(ROOT).as_posix() for p in import_closure(ROOT / f"workflow/scripts/{script}", ROOT / "pruning")}

    score, obs = rel("mask.py"), rel("mask_sparsegpt.py")
    assert {"pruning/weights/prune.py", "pruning/weights/scores.py", "pruning/models/mixtral.py"} <= score
    assert not {"pruning/weights/sparsegpt.py", "pruning/weights/hessian.py"} & score
    assert {"pruning/weights/sparsegpt.py", "pruning/weights/hessian.py", "pruning/models/deepseek.py"} <= obs
