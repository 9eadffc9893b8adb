"""Expert-wise knowledge distillation: the loss against a naive per-token computation, λ initialisation,
fixed (also N:M) masks, and resume == uninterrupted, bitwise, on a tiny Mixtral."""
import copy
import math

import pytest
import torch
from torch import nn

from conftest import make_tiny_mixtral
from pruning.distill import train as distill
from pruning.distill.loss import MoECapture, expert_loss
from pruning.experts.removal import reduce_experts
from pruning.models import get_adapter
from pruning.weights.masks import nm_mask, unstructured_mask
from pruning.weights.sparsity import check_nm


def _random_masks(adapter, model, pattern="0.5", seed=3):
    """Keep-masks from random scores for every layer's fused expert weights, applied to the model."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for i in adapter.moe_layer_indices():
        layer = {}
        for name, w in adapter.expert_params(adapter.decoder_layers(model)[i]).items():
            rows = []
            for e in range(w.shape[0]):
                s = torch.rand(w.shape[1:], generator=g)
                rows.append(nm_mask(s, 2, 4) if pattern == "2:4" else unstructured_mask(s, float(pattern)))
            layer[name] = torch.stack(rows)
            with torch.no_grad():
                w.mul_(layer[name])
        masks[i] = layer
    return masks


def _pair(dtype=torch.float64, drop=None, pattern="0.5"):
    """(teacher, student, masks): the student is the teacher with random masks, optionally minus some experts."""
    teacher = make_tiny_mixtral(seed=0).to(dtype)
    student = copy.deepcopy(teacher)
    sa = get_adapter(student.config)
    if drop is not None:
        kept = {i: [e for e in range(sa.num_experts) if e not in drop[i]] for i in sa.moe_layer_indices()}
        reduce_experts(sa, student, kept)
        sa = get_adapter(student.config)
    masks = _random_masks(sa, student, pattern)
    return teacher, student, masks


def _block_inputs(model, ids):
    """The MoE block's input per layer via a forward pre-hook on the stock block (not the experts module)."""
    got = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: got.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return got


def _expert(gate_up, down, x):  # one expert on one token, written out: W2 (silu(W1 x) * (W3 x))
    inter = down.shape[1]
    return down @ (nn.functional.silu(gate_up[:inter] @ x) * (gate_up[inter:] @ x))


def _naive_expert_loss(teacher, student, ids, inputs="teacher", tokens="teacher_routed", per_layer=False):
    """Σ_layers Σ_experts mean over (tokens x hidden) of the squared difference, token by token (with
    ``per_layer``: the list of each layer's term)."""
    xt_all, xs_all = _block_inputs(teacher, ids), _block_inputs(student, ids)
    kept = getattr(student.config, "pruned_experts", None)
    terms = []
    for i, (tl, sl) in enumerate(zip(teacher.model.layers, student.model.layers)):
        total = 0.0
        xt, xs = xt_all[i], xs_all[i]
        k = teacher.config.num_experts_per_tok
        E = student.config.num_local_experts
        orig = kept["kept"][str(i)] if kept else list(range(E))
        for j, o in enumerate(orig):
            sq, count = 0.0, 0
            for t in range(xt.shape[0]):
                probs = torch.softmax(tl.mlp.gate.weight @ xt[t], dim=-1)
                chosen = torch.topk(probs, k).indices.tolist()
                if tokens == "teacher_routed" and o not in chosen:
                    continue
                x = xt[t] if inputs == "teacher" else xs[t]
                yt = _expert(tl.mlp.experts.gate_up_proj[o], tl.mlp.experts.down_proj[o], x)
                ys = _expert(sl.mlp.experts.gate_up_proj[j], sl.mlp.experts.down_proj[j], x)
                sq += float(((ys - yt) ** 2).sum())
                count += 1
            if count:
                total += sq / (count * xt.shape[1])
        terms.append(total)
    return terms if per_layer else sum(terms)


def _library_expert_loss(teacher, student, ids, inputs, tokens):
    ta, sa = get_adapter(teacher.config), get_adapter(student.config)
    tc, sc = MoECapture(ta, teacher), MoECapture(sa, student)
    with torch.no_grad():
        with tc():
            teacher.base_model(input_ids=ids)
        with sc():
            student(input_ids=ids)
        loss, per_layer = expert_loss(ta, teacher, sa, student, tc, sc, inputs, tokens)
    return loss.item(), [t.item() for t in per_layer]


@pytest.mark.parametrize("inputs,tokens", [("teacher", "teacher_routed"), ("student", "teacher_routed"), ("teacher", "all")])
@pytest.mark.parametrize("drop", [None, {0: [1], 1: [3]}], ids=["same experts", "expert-pruned student"])
def test_expert_term_equals_a_per_token_loop(inputs, tokens, drop):
    teacher, student, _ = _pair(drop=drop)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    got, per_layer = _library_expert_loss(teacher, student, ids, inputs, tokens)
    want = _naive_expert_loss(teacher, student, ids, inputs, tokens, per_layer=True)
    assert all(w > 0 for w in want)
    assert per_layer == pytest.approx(want, rel=1e-9)  # each layer's term against its own per-token loop
    assert got == pytest.approx(sum(want), rel=1e-9)


def test_expert_term_is_zero_for_the_teacher_itself():
    teacher = make_tiny_mixtral(seed=0).double()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    assert _library_expert_loss(teacher, copy.deepcopy(teacher), ids, "teacher", "teacher_routed")[0] == 0.0


def test_cosine_schedule_hand_worked():
    assert distill.cosine_lr(0, 4, 1.0) == 1.0
    assert distill.cosine_lr(2, 4, 1.0) == pytest.approx(0.5)
    assert distill.cosine_lr(4, 4, 1.0) == pytest.approx(0.0)
    assert [distill.cosine_lr(s, 6, 1.0, warmup=2) for s in (0, 1)] == [0.5, 1.0]
    assert distill.cosine_lr(4, 6, 1.0, warmup=2) == pytest.approx(0.5)


def test_data_order_is_a_seeded_permutation_per_epoch():
    cfg = distill.KDConfig(epochs=2, batch_size=2, grad_accum=2, seed=0)
    seen = [torch.cat(distill.micro_batches(s, 9, cfg)[1]) for s in range(2)]  # 9 samples: 2 steps of 4
    assert len(set(torch.cat(seen).tolist())) == 8  # no repeat inside the epoch; one sample left over
    epoch, batches = distill.micro_batches(2, 9, cfg)
    assert epoch == 1 and not torch.equal(torch.cat(batches), seen[0])  # a new order in the next epoch


def _data(n=8, seqlen=12, seed=7):
    return torch.randint(0, 64, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _run(teacher, student, masks, cfg, **kw):
    return distill.distill(student, teacher, get_adapter(student.config), get_adapter(teacher.config), masks, _data(),
                           cfg, progress=False, **kw)


def test_lambda_is_ce_over_expert_loss_at_the_first_step():
    teacher, student, masks = _pair(dtype=torch.float32)
    cfg = distill.KDConfig(epochs=1, lr=1e-3, batch_size=4, seed=0)
    _, first = distill.micro_batches(0, 8, cfg)
    ids = _data()[first[0]]
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    ce = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    lexp = _naive_expert_loss(teacher.double(), student.double(), ids)
    teacher, student = teacher.float(), student.float()
    record = _run(teacher, student, masks, cfg)
    assert record["lambda_source"] == "initial L_CE / L_expert"
    assert record["lambda"] == pytest.approx(ce / lexp, rel=1e-4)
    first_row = record["history"][0]
    assert first_row["weighted_expert_loss"] == pytest.approx(first_row["ce_loss"], rel=1e-6)  # both terms start equal

    teacher, student, masks = _pair(dtype=torch.float32)
    fixed = _run(teacher, student, masks, distill.KDConfig(epochs=1, lr=1e-3, batch_size=4, lambda_=0.25))
    assert fixed["lambda"] == 0.25 and fixed["lambda_source"] == "fixed"


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_masks_stay_fixed_while_everything_trains(pattern):
    teacher, student, masks = _pair(dtype=torch.float32, pattern=pattern)
    t_before = {n: p.clone() for n, p in teacher.named_parameters()}
    s_before = {n: p.clone() for n, p in student.named_parameters()}
    # weight decay would shrink pruned positions of a plain optimiser; a large lr makes any leak visible
    cfg = distill.KDConfig(epochs=2, lr=5e-2, batch_size=4, weight_decay=0.1, seed=0)
    _run(teacher, student, masks, cfg)
    sa = get_adapter(student.config)
    for i, layer_masks in masks.items():
        params = sa.expert_params(sa.decoder_layers(student)[i])
        for name, m in layer_masks.items():
            w = params[name].detach()
            assert bool((w[~m] == 0).all()), (i, name)
            assert bool((w[m] != s_before[f"model.layers.{i}.mlp.experts.{name}_proj"][m]).any())  # kept weights trained
            if pattern == "2:4":
                check_nm(w, m, 2, 4)
    for n, p in student.named_parameters():  # every parameter trains (router, attention, norms, embeddings)
        assert not torch.equal(p, s_before[n]), n
    for n, p in teacher.named_parameters():  # the teacher is untouched and gets no gradient
        assert torch.equal(p, t_before[n]) and p.grad is None, n


def test_expert_pruned_student_trains_against_matching_teacher_experts():
    teacher, student, masks = _pair(dtype=torch.float32, drop={0: [1], 1: [3]})
    record = _run(teacher, student, masks, distill.KDConfig(epochs=2, lr=1e-2, batch_size=4, seed=0))
    assert student.config.num_local_experts == 3
    assert record["history"][-1]["expert_loss"] < record["history"][0]["expert_loss"]


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_equals_uninterrupted_bitwise(tmp_path):
    cfg = distill.KDConfig(epochs=3, lr=1e-2, batch_size=2, grad_accum=2, weight_decay=0.01, checkpoint_every=2, seed=1)
    torch.use_deterministic_algorithms(True)
    try:
        teacher, student, masks = _pair(dtype=torch.float32, pattern="2:4")
        full = _run(teacher, student, masks, cfg, state_dir=tmp_path / "a", fingerprint="x")
        want = _state(student)
        assert full["resumed_from_step"] == 0 and full["total_steps"] == 6

        class Killed(Exception):
            pass

        def kill_after_second_state(step):
            if step == 4:
                raise Killed

        teacher, student, masks = _pair(dtype=torch.float32, pattern="2:4")
        with pytest.raises(Killed):
            _run(teacher, student, masks, cfg, state_dir=tmp_path / "b", fingerprint="x", on_checkpoint=kill_after_second_state)
        assert [p.name for p in (tmp_path / "b").iterdir()] == ["step_00000004"]  # older states removed
        teacher, student, masks = _pair(dtype=torch.float32, pattern="2:4")  # a new process: fresh models
        resumed = _run(teacher, student, masks, cfg, state_dir=tmp_path / "b", fingerprint="x")
        assert resumed["resumed_from_step"] == 4
        got = _state(student)
        for n in want:
            assert torch.equal(got[n], want[n]), n
        assert resumed["history"] == full["history"] and resumed["lambda"] == full["lambda"]

        teacher, student, masks = _pair(dtype=torch.float32, pattern="2:4")  # other settings: the state is not used
        other = _run(teacher, student, masks, cfg, state_dir=tmp_path / "b", fingerprint="y")
        assert other["resumed_from_step"] == 0
    finally:
        torch.use_deterministic_algorithms(False)


def test_too_few_samples_for_one_step_is_an_error():
    teacher, student, masks = _pair(dtype=torch.float32)
    with pytest.raises(ValueError, match="one step"):
        _run(teacher, student, masks, distill.KDConfig(batch_size=16))


def test_config_rejects_unknown_modes():
    with pytest.raises(ValueError, match="expert_tokens"):
        distill.KDConfig(expert_tokens="student_routed")
    assert math.isclose(distill.KDConfig.from_params({"lr": 1e-4, "lambda": 2.0, "samples": 3}, 5).lambda_, 2.0)


def test_bf16_teacher_with_fp32_student():
    """The pipeline trains fp32 master weights against a teacher in the model's dtype (bf16 for real models)."""
    teacher, student, masks = _pair(dtype=torch.float32)
    teacher = teacher.to(torch.bfloat16)
    record = _run(teacher, student, masks, distill.KDConfig(epochs=1, lr=1e-3, batch_size=4))
    assert math.isfinite(record["history"][-1]["loss"]) and record["lambda"] > 0
    assert all(p.dtype == torch.float32 for p in student.parameters())
