"""The MoE-block output error diagnostic against the stock transformers MoE block."""
import torch

from pruning.adapters import get_adapter
from pruning.diagnose import channel_outlier_ratio, moe_block_output, relative_block_error
from pruning.hessian import route_all


def test_block_output_equals_stock_moe_block(tiny_mixtral):
    model, adapter = tiny_mixtral, get_adapter(tiny_mixtral.config)
    mlp = model.model.layers[1].mlp
    x = torch.randn(40, model.config.hidden_size)
    routing = route_all(lambda t: adapter.route(mlp.gate.weight, t), x)
    gu, dn = mlp.experts.gate_up_proj.detach(), mlp.experts.down_proj.detach()
    with torch.no_grad():
        stock = mlp(x[None])
        stock = stock[0] if isinstance(stock, tuple) else stock
    torch.testing.assert_close(moe_block_output(gu, dn, adapter.activation(), x, routing).float(), stock[0], rtol=1e-5, atol=1e-6)
    assert relative_block_error((gu, dn), (gu, dn), adapter.activation(), x, routing) == 0.0
    half = relative_block_error((gu, dn), (gu, dn * 0.5), adapter.activation(), x, routing)
    assert abs(half - 0.5) < 1e-9  # down_proj scaled by 1/2 halves every expert output


def test_channel_outlier_ratio_hand_example():
    sum_x2 = torch.tensor([[1.0, 4.0, 100.0], [0.0, 0.0, 0.0]])  # norms 1, 2, 10 -> max 10 / median 2
    assert channel_outlier_ratio(sum_x2) == 5.0
