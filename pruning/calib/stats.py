"""Per-layer calibration statistics of an MoE block, accumulated in float32 over routed tokens.

Per expert e (R_e = tokens routed to e, g_t = the combine weight the block applies to e's output):
  count[e]            |R_e|
  gate_up.sum_x2[e]   sum_{t in R_e} x_t^2              (H,)  input of gate_up           (Wanda)
  gate_up.sum_gx2[e]  sum_{t in R_e} (g_t x_t)^2        (H,)                             (MoE-Pruner)
  down.sum_x2[e]      sum_{t in R_e} h_t^2              (I,)  h = SwiGLU intermediate = input of down
  down.sum_gx2[e]     sum_{t in R_e} (g_t h_t)^2        (I,)
Per layer (router): selection count per expert, top-1 count, mean combine weight over routed tokens,
and quantiles of the second/first top-k weight ratio (top_k >= 2).
"""
from __future__ import annotations

import torch

from ..moe import Routing

RATIO_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class LayerStats:
    """Accumulates one layer's statistics, expert call by expert call, in float32.

    The four per-expert column statistics live side by side in one row per expert, [sum x^2 | sum h^2 |
    sum (g x)^2 | sum (g h)^2], filled through one reused scratch buffer: an expert call costs a few tensor
    operations (four products into the buffer, one in-place square, one column sum, one add) and no allocation,
    instead of a temporary and a reduction per statistic. Every product is the per-statistic form's float32
    operation on the same numbers (``(x * x).sum(0)``, ``((g * x) ** 2).sum(0)``, ...), and the results are bitwise
    the per-statistic form's (tests/test_calibration.py): a CPU column sum does not depend on its neighbours,
    except that a tensor's last columns beyond a multiple of the vector width are summed in another order, so
    when H or I is not a multiple of ``ALIGN`` each statistic is summed on its own (a view: still no copy).
    """

    ALIGN = 32  # two AVX-512 vectors of float32: column blocks of this width sum alike wherever they lie

    def __init__(self, num_experts: int, hidden: int, intermediate: int, device="cpu"):
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        self._sums = torch.zeros(num_experts, 2 * (hidden + intermediate), dtype=torch.float32, device=device)
        self._count = [0] * num_experts
        self._sum_weight = torch.zeros(num_experts, dtype=torch.float32, device=device)
        self._top1 = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self._scratch: torch.Tensor | None = None
        self._ratios: list[torch.Tensor] = []

    def _buffer(self, n: int, device) -> torch.Tensor:
        """(n, 2(H + I)) float32 scratch rows, reused across calls (grown when a call has more tokens)."""
        if self._scratch is None or self._scratch.shape[0] < n or self._scratch.device != device:
            self._scratch = torch.empty(n, self._sums.shape[1], dtype=torch.float32, device=device)
        return self._scratch[:n]

    def add_expert(self, e: int, x: torch.Tensor, g: torch.Tensor, h: torch.Tensor | None) -> None:
        """x (n, H) routed inputs, g (n,) their combine weights, h (n, I) the SwiGLU intermediate."""
        n = x.shape[0]
        self._count[e] += n
        if n == 0:
            return
        H, I = self.hidden, self.intermediate
        x, h, g = x.float(), h.float(), g.float()[:, None]
        buf = self._buffer(n, x.device)
        torch.mul(x, x, out=buf[:, :H])
        torch.mul(h, h, out=buf[:, H : H + I])
        gated = buf[:, H + I :]
        torch.mul(g, x, out=gated[:, :H])
        torch.mul(g, h, out=gated[:, H:])
        gated.mul_(gated)  # (g x)^2, (g h)^2 (``t ** 2`` is t * t)
        if H % self.ALIGN == 0 and I % self.ALIGN == 0:
            self._sums[e] += buf.sum(0)
        else:
            for a, b in ((0, H), (H, H + I), (H + I, 2 * H + I), (2 * H + I, 2 * (H + I))):
                self._sums[e, a:b] += buf[:, a:b].sum(0)
        self._sum_weight[e] += g.sum()

    def add_routing(self, routing: Routing) -> None:
        """One experts-module call's routing (index, weights: (T, k))."""
        w = routing.weights.float()
        first = w.argmax(dim=-1)
        top1 = routing.index.gather(1, first[:, None])[:, 0]
        self._top1 += torch.bincount(top1, minlength=self.num_experts)[: self.num_experts]
        if w.shape[1] >= 2:
            top2 = torch.topk(w, 2, dim=-1).values
            self._ratios.append((top2[:, 1] / top2[:, 0]).cpu())

    def finalize(self) -> dict[str, torch.Tensor]:
        H, I = self.hidden, self.intermediate
        sums = self._sums.cpu()
        out = {
            "count": torch.tensor(self._count, dtype=torch.int64),
            "gate_up.sum_x2": sums[:, :H].contiguous(),
            "gate_up.sum_gx2": sums[:, H + I : 2 * H + I].contiguous(),
            "down.sum_x2": sums[:, H : H + I].contiguous(),
            "down.sum_gx2": sums[:, 2 * H + I :].contiguous(),
            "router.top1_count": self._top1.cpu(),
            "router.sum_weight": self._sum_weight.cpu(),
        }
        self._scratch = None
        count = out["count"].clamp(min=1).float()
        out["router.mean_weight"] = out.pop("router.sum_weight") / count
        out["router.selection_count"] = out["count"].clone()
        q = torch.tensor(RATIO_QUANTILES, dtype=torch.float64)
        if self._ratios:
            out["router.ratio_quantiles"] = torch.quantile(torch.cat(self._ratios).double(), q).float()
        else:
            out["router.ratio_quantiles"] = torch.full((len(q),), float("nan"))
        out["router.ratio_levels"] = q.float()
        return out


def channel_outlier_ratio(sum_x2: torch.Tensor) -> float:
    """Largest over median input-channel norm, sqrt(sum over experts and routed tokens of x_j^2): (E, H) -> scalar.

    Near 1: no outlier features, so activation-aware scores (Wanda, MoE-Pruner) rank weights almost like magnitude.
    """
    norms = sum_x2.double().sum(0).sqrt()
    return float(norms.max() / norms.median())


STAT_KEYS = ("count", "gate_up.sum_x2", "gate_up.sum_gx2", "down.sum_x2", "down.sum_gx2")


class StatsFileError(ValueError):
    """A statistics file that does not fit the job using it: one line naming the file."""


def load_layer_stats(path, layer: int, experts) -> dict[str, torch.Tensor]:
    """One layer's statistics file (``LayerStats.finalize``, as the calibration jobs write it), checked from its
    header first against the job's layer and its experts (``pruning.moe.Experts``): a file that is no statistics
    file, or holds another layer's or another model's statistics, fails with one line naming it."""
    from safetensors.torch import load_file

    from ..safetensors_io import check_file

    try:
        meta, tensors = check_file(path)
    except (OSError, ValueError) as exc:
        raise StatsFileError(f"not a statistics file: {exc}") from None
    missing = [k for k in STAT_KEYS if k not in tensors]
    if missing:
        raise StatsFileError(f"{path}: not a layer's calibration statistics (no {missing[0]!r})")
    if meta.get("layer") is not None and str(meta["layer"]) != str(layer):
        raise StatsFileError(f"{path}: statistics of layer {meta['layer']}, this job's layer is {layer}")
    e, h, i = experts.num_experts, experts.gate_up.shape[-1], experts.intermediate_size
    want = {"count": (e,), "gate_up.sum_x2": (e, h), "gate_up.sum_gx2": (e, h), "down.sum_x2": (e, i), "down.sum_gx2": (e, i)}
    for k, w in want.items():
        if tuple(tensors[k].shape) != w:
            raise StatsFileError(f"{path}: {k} has shape {tuple(tensors[k].shape)}, layer {layer} of this model needs {w} "
                                 f"({e} experts, hidden size {h}, intermediate size {i}): statistics of another model")
    return load_file(str(path))
