"""The library files a script runs: its import closure within one package, read from the source (nothing is
imported). The workflow makes them a rule's inputs, so that editing a module reruns exactly the jobs whose
scripts import it, directly or indirectly.

Every ``import``/``from ... import`` statement counts, wherever it stands (inside a function too: a lazy
import runs all the same), and so does each package's ``__init__.py`` on the way to a module (Python runs
it first). ``from pkg.sub import name`` counts ``pkg/sub/name.py`` too when ``name`` is a submodule.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path


def _module_file(root: Path, parts: tuple[str, ...]) -> Path | None:
    """The file of module ``parts`` (package name first) under ``root`` (the package's parent), or None."""
    base = root.joinpath(*parts)
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _package_of(root: Path, path: Path) -> tuple[str, ...] | None:
    """The dotted parts of the package ``path`` belongs to, if it lies under ``root``."""
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return rel.parent.parts


def _imported(tree: ast.AST, package: tuple[str, ...] | None) -> set[tuple[str, ...]]:
    """Dotted names a module's source may import, each also with its possible submodule suffix."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(tuple(a.name.split(".")) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: only meaningful inside the package
                if package is None or node.level - 1 > len(package):
                    continue
                head = package[: len(package) - (node.level - 1)]
                mod = head + (tuple(node.module.split(".")) if node.module else ())
            else:
                mod = tuple(node.module.split("."))
            names.add(mod)
            names.update(mod + (a.name,) for a in node.names if a.name != "*")
    return names


@lru_cache(maxsize=None)
def _direct(path: Path, root: Path, name: str) -> tuple[Path, ...]:
    """Files of package ``name`` under ``root`` that the module ``path`` imports directly."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for parts in sorted(_imported(tree, _package_of(root, path))):
        if parts[0] != name:
            continue
        for k in range(1, len(parts) + 1):  # every package on the way, then the module itself
            f = _module_file(root, parts[:k])
            if f is not None:
                out.append(f)
    return tuple(dict.fromkeys(out))


def import_closure(script, package_dir) -> list[Path]:
    """Every file of the package at ``package_dir`` that running ``script`` imports, sorted.

    >>> import_closure("workflow/scripts/mask.py", "pruning")  # doctest: +SKIP
    [PosixPath('pruning/__init__.py'), PosixPath('pruning/atomic.py'), ...]
    """
    package_dir = Path(package_dir).resolve()
    root, name = package_dir.parent, package_dir.name
    seen: set[Path] = set()
    todo = [Path(script).resolve()]
    while todo:
        for f in _direct(todo.pop(), root, name):
            if f not in seen:
                seen.add(f)
                todo.append(f)
    return sorted(seen)
