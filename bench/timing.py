"""Shared by the benchmark scripts: the repository on sys.path, and a median wall-clock timer."""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def timed(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def splice_readme(readme, block: str, report: str) -> None:
    """Write ``report`` into ``readme`` between ``<!-- {block}:begin -->`` and ``<!-- {block}:end -->`` (atomically)."""
    from pruning.atomic import write_text

    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    text = Path(readme).read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        write_text(readme, f"{head}{begin}\n{report}\n{end}{rest.split(end, 1)[1]}")
    else:
        print(f"{readme}: no {block} markers; not written")
