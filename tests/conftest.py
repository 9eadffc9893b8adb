import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: starts a one-node SLURM cluster (bench/slurm/cluster.sh, root, apt)")


def make_tiny_mixtral(seed=0, hidden=32, inter=48, layers=2, experts=4, top_k=2, vocab=64):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=128, sliding_window=None, tie_word_embeddings=False,
        initializer_range=0.2, attn_implementation="sdpa", experts_implementation="eager",
    )
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_mixtral():
    return make_tiny_mixtral()
