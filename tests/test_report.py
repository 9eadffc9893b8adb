"""The report's figures draw the rows' values: series, points and images checked against hand-made rows.
(tests/test_workflow.py checks the same on a real run: its PNG files are these figures of its rows.)"""
import math

import numpy as np
import pytest
from matplotlib.collections import PathCollection
from matplotlib.image import AxesImage

from pruning.report import plots
from pruning.variant import Variant


def _lines(ax):
    """{label: (xs, ys)} of an axes' lines (axhlines included)."""
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def _crosses(ax):
    return [tuple(p) for c in ax.collections if isinstance(c, PathCollection) for p in c.get_offsets()]


def test_ppl_figure_draws_each_method_and_nm_points():
    points = [
        {"prop": "dense", "series": "Wanda", "label": "60%", "x": 0.6, "y": 30.0},
        {"prop": "dense", "series": "Wanda", "label": "50%", "x": 0.5, "y": 20.0},
        {"prop": "dense", "series": "Wanda", "label": "2:4", "x": 0.5, "y": 40.0},
        {"prop": "dense", "series": "MoE-Pruner", "label": "50%", "x": 0.5, "y": 18.0},
        {"prop": "sequential", "series": "Wanda", "label": "50%", "x": 0.5, "y": 19.0},
    ]
    fig = plots.ppl_figure(points, dense_ppl=10.0)
    dense, seq = fig.axes
    lines = _lines(dense)
    assert lines["Wanda"] == ([0.5, 0.6], [20.0, 30.0])  # unstructured points, sorted by sparsity
    assert lines["MoE-Pruner"] == ([0.5], [18.0])
    assert lines["dense"][1] == [10.0, 10.0]  # the dense model as a horizontal line
    assert _crosses(dense) == [(0.5, 40.0)]  # N:M as a cross
    assert [t.get_text() for t in dense.texts] == ["2:4"]
    assert _lines(seq)["Wanda"] == ([0.5], [19.0]) and seq.get_title() == "sequential propagation"
    plots.plt.close(fig)


def test_usage_figure_shows_the_fraction_routed_and_removed_experts():
    usage = {"calls_per_token": 2.0, "layers": {"0": {"tokens": 10, "selections": {"0": 5, "1": 10, "2": 5}},
                                                "1": {"tokens": 10, "selections": {"0": 8, "2": 12}}}}
    fig = plots.usage_figure([("dense", usage)], num_experts=3)
    (img,) = [a for a in fig.axes[0].get_children() if isinstance(a, AxesImage)]
    data = img.get_array()
    assert data[0].tolist() == [0.5, 1.0, 0.5]
    assert data.mask[1].tolist() == [False, True, False] and data[1][[0, 2]].tolist() == [0.8, 1.2]  # expert 1 removed
    assert fig.axes[0].get_title() == "dense\n2.00 expert calls / token"
    plots.plt.close(fig)


def test_distill_figure_draws_every_step_and_the_trailing_mean():
    history = [{"step": s, "ce_loss": c, "expert_loss": e} for s, c, e in
               [(1, 4.0, 1.0), (2, 2.0, 0.5), (3, 3.0, 0.25), (4, 1.0, 0.5), (5, 2.0, 0.25), (6, 0.0, 0.125),
                (7, 1.0, 0.25), (8, 3.0, 0.5), (9, 2.0, 1.0), (10, 1.0, 0.5), (11, 0.0, 0.25), (12, 2.0, 0.125),
                (13, 1.0, 0.5), (14, 3.0, 0.25), (15, 2.0, 1.0), (16, 0.0, 0.5)]]
    fig = plots.distill_figure([{"label": "MoE-Pruner 50%, expert-wise KD", "variant": 0, "tune": "kd", "history": history}])
    ce, _ = fig.axes
    raw, smooth = ce.get_lines()
    assert list(raw.get_ydata()) == [h["ce_loss"] for h in history]
    ys = [h["ce_loss"] for h in history]  # window = 16 // 8 = 2: the mean of each step and the one before
    assert list(smooth.get_ydata()) == pytest.approx([ys[0]] + [(ys[i - 1] + ys[i]) / 2 for i in range(1, 16)])
    assert smooth.get_label() == "MoE-Pruner 50%, expert-wise KD" and smooth.get_linestyle() == "-"
    plots.plt.close(fig)


def _row(v, acc, sparsity=0.0, expert_sparsity=0.0, kept=8, skipping=False):
    pattern = v.pattern.kind if v.weight_pruned else None
    return {"variant": v, "id": v.id, "acc_avg": acc, "pattern": pattern, "sparsity": sparsity,
            "expert_sparsity": expert_sparsity, "expert_method": v.base.split("-k")[0] if v.base != "full" else None,
            "experts_kept": kept, "experts_total": 8, "skipping": skipping, "base": v.base}


def test_accuracy_figure_draws_methods_from_the_dense_point():
    m = "tiny"
    rows = [
        _row(Variant(m), 0.40),
        _row(Variant(m, "naee-k6"), 0.38, kept=6), _row(Variant(m, "naee-k4"), 0.35, kept=4),
        _row(Variant(m, "full", skip=True), 0.39, skipping=True),
        _row(Variant(m, calib="c", prop="dense", method="wanda", sp="0.5"), 0.36, 0.5, 0.5),
        _row(Variant(m, calib="c", prop="dense", method="wanda", sp="2of4"), 0.30, 0.5, 0.5),
    ]
    fig = plots.accuracy_figure(rows, chance=0.25)
    weights, experts = fig.axes
    lw, le = _lines(weights), _lines(experts)
    assert lw["Wanda"] == ([0.0, 0.5], [0.40, 0.36])  # from the dense point; 2:4 is a cross
    assert _crosses(weights) == [(0.5, 0.30)]
    assert le["NAEE (layerwise)"] == ([0.0, 0.25, 0.5], [0.40, 0.38, 0.35])  # x = fraction of experts removed
    assert (0.0, 0.39) in _crosses(experts)  # dense + skipping
    assert lw["chance"][1] == [0.25, 0.25] and le["dense"][1] == [0.40, 0.40]
    plots.plt.close(fig)


def test_accuracy_figure_without_lm_eval_says_so():
    """lm_eval.tasks: [] (documented as off): no accuracies anywhere; the figure is drawn, empty, with a note
    (it crashed on the dense model's missing accuracy before)."""
    m = "tiny"
    rows = [_row(Variant(m), None), _row(Variant(m, calib="c", prop="dense", method="wanda", sp="0.5"), None, 0.5, 0.5)]
    fig = plots.accuracy_figure(rows, chance=None)
    for ax in fig.axes:
        assert not ax.get_lines() and [t.get_text() for t in ax.texts] == ["no lm-eval accuracy (lm_eval.tasks: [])"]
    plots.plt.close(fig)


def test_expert_sparsity_figure_maps_kept_experts_to_their_original_index():
    layers = {"0": {"experts": [{"gate": 0.5, "up": 0.5, "down": 0.5}, {"gate": 0.25, "up": 0.5, "down": 0.75}]},
              "1": {"experts": [{"gate": 0.0, "up": 0.0, "down": 0.3}, {"gate": 0.5, "up": 0.5, "down": 0.5}]}}
    mat = plots.expert_sparsity_matrix(layers, kept=[[0, 2], [1, 2]], num_experts=3)
    assert np.allclose(mat, [[0.5, 1.0, 0.5], [1.0, 0.1, 0.5]])
    fig = plots.expert_sparsity_figure([("Wanda 50% on NAEE", mat)])
    (img,) = [a for a in fig.axes[0].get_children() if isinstance(a, AxesImage)]
    assert np.allclose(img.get_array(), mat)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["50%", "cut", "50%", "cut", "10%", "50%"]  # removed experts are marked "cut"
    plots.plt.close(fig)
    assert math.isnan(plots.usage_matrix({"layers": {"0": {"tokens": 4, "selections": {"1": 4}}}}, 2)[0][0])
