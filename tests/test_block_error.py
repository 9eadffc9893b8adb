"""The MoE-block output error diagnostic, on a real tiny Mixtral."""
import torch

from pruning.eval.block_error import relative_block_error
from pruning.models import get_adapter
from pruning.moe import Experts, Router


def test_relative_block_error_hand_cases(tiny_mixtral):
    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    layer = model.model.layers[1]
    x = torch.randn(40, model.config.hidden_size)
    routing = Router(adapter.router(layer).weight.detach(), adapter.rule()).route(x)
    ex = adapter.expert_weights(layer)
    dense = Experts(ex.gate_up.detach(), ex.down.detach(), adapter.activation())
    assert relative_block_error(dense, dense, x, routing) == 0.0
    half = Experts(dense.gate_up, dense.down * 0.5, dense.act)
    assert abs(relative_block_error(dense, half, x, routing) - 0.5) < 1e-9  # down_proj / 2 halves every expert output
    # the pruned experts built one at a time (the job's form) give the same number
    assert relative_block_error(dense, lambda e: half.expert(e), x, routing) == relative_block_error(dense, half, x, routing)
    # one expert zeroed: the error is that expert's share of the output, computed token by token
    cut = Experts(dense.gate_up, dense.down.clone(), dense.act)
    cut.down[2] = 0
    y, lost = torch.zeros(40, x.shape[1], dtype=torch.float64), torch.zeros(40, x.shape[1], dtype=torch.float64)
    for t in range(40):
        for e, g in zip(routing.index[t].tolist(), routing.weights[t].double()):
            inter = dense.down.shape[-1]
            xt = x[t].double()
            f = dense.down[e].double() @ (torch.nn.functional.silu(dense.gate_up[e][:inter].double() @ xt)
                                          * (dense.gate_up[e][inter:].double() @ xt))
            y[t] += g * f
            lost[t] += g * f if e == 2 else 0
    assert abs(relative_block_error(dense, cut, x, routing) - float(lost.norm() / y.norm())) < 1e-9
