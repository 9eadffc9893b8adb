"""The sparsity pattern of weight pruning: unstructured at a fraction, or N:M, and its three spellings.

    value (params.yaml)   token (paths)   label (tables)   metric key (DVC, dot-free)
    0.5                   0.5             50%              sp50
    "2:4"                 2of4            2:4              2of4
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` at ``sparsity``, or ``n:m`` (prune N of every M consecutive input weights)."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, value) -> "Pattern":
        """From a params value (0.5, "0.5", "2:4") or a path token ("2of4")."""
        if isinstance(value, str) and ("of" in value or ":" in value):
            n, m = (int(x) for x in value.replace("of", ":").split(":"))
            if not (0 < n < m):
                raise ValueError(f"N:M pattern {value!r} needs 0 < N < M")
            return cls(n=n, m=m)
        s = float(value)
        if not (0.0 < s < 1.0):
            raise ValueError(f"sparsity {value!r} must lie in (0, 1)")
        return cls(sparsity=s)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def target(self) -> float:
        """The fraction of weights pruned."""
        return self.n / self.m if self.is_nm else self.sparsity

    @property
    def kind(self) -> str:
        """'unstructured', or the N:M pattern itself ('2:4')."""
        return str(self) if self.is_nm else "unstructured"

    @property
    def token(self) -> str:
        """Path-safe spelling: '0.5', '2of4'."""
        return f"{self.n}of{self.m}" if self.is_nm else f"{self.sparsity:g}"

    @property
    def label(self) -> str:
        """Table spelling: '50%', '2:4'."""
        return str(self) if self.is_nm else f"{self.sparsity:.0%}"

    @property
    def metric_key(self) -> str:
        """Dot-free key (DVC flattens nested metrics with '.'): 'sp50', '2of4'."""
        return self.token if self.is_nm else f"sp{self.sparsity * 100:g}".replace(".", "_")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"
