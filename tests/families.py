"""Tiny random checkpoints of eight MoE families, built from transformers' (5.24) own config classes.

Every family keeps the structural keys of the real hub models (shared experts, dense first layers,
group-limited routing, selection biases, sliding attention, ...) scaled down to hidden size 32 and
vocab 300, so a forward over 8x32 tokens takes milliseconds on CPU.

Public API::

    FAMILIES                      # the eight model_type names
    LAYOUTS[family]               # on-disk layouts: ("fused", "per_expert") or ("fused",) for gpt_oss
    make_config(family, **overrides) -> PretrainedConfig
    make_model(family, seed=0, **overrides) -> PreTrainedModel (eval, fp32, sdpa, eager experts)
    save_checkpoint(family, out_dir, layout="fused", seed=0, tokenizer=None, **overrides) -> Path
    tiny_tokenizer(vocab_size=300) -> PreTrainedTokenizerFast (byte-level BPE, offline, deterministic)
    moe_layers(model) -> list[int]  # decoder layers whose ``mlp`` is a routed MoE block
    router_of(mlp) -> module        # ``mlp.gate`` (``mlp.router`` for gpt_oss)

Layouts (``model.save_pretrained``):

* ``"per_expert"``: ``save_original_format=True`` (the 5.24 default): transformers reverses its
  conversion mapping and writes the hub's layout, one tensor per expert and projection, e.g.
  ``model.layers.1.mlp.experts.3.gate_proj.weight`` (Mixtral: ``block_sparse_moe.experts.3.w1.weight``).
* ``"fused"``: ``save_original_format=False``: the transformers-5 in-memory layout,
  ``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I).
  gpt_oss has no conversion mapping: its hub layout *is* the fused one, ``gate_up_proj`` (E, H, 2I) with
  gate/up interleaved on the last axis, ``down_proj`` (E, I, H), plus ``*_bias``; so only "fused" exists.

Random init leaves selection biases (``e_score_correction_bias``) and gpt-oss expert biases at zero,
which would hide bias bugs; :func:`make_model` fills them with seeded random values.

Notes on transformers 5.24 (checked here):

* E lives under different keys: mixtral/gpt_oss ``num_local_experts`` (alias ``num_experts``); qwen2_moe
  ``num_experts`` only; olmoe ``num_experts`` (alias ``num_local_experts``); qwen3_moe declares ``num_experts``
  but maps it to ``num_local_experts``, so its config.json says ``"num_local_experts"`` (hub files say
  ``num_experts``; both load); deepseek_v2 ``n_routed_experts`` (alias ``num_experts``), deepseek_v3 / glm4_moe
  ``n_routed_experts`` (alias ``num_local_experts``; ``config.num_experts`` does not exist there).
* gpt_oss refuses ``attn_implementation="sdpa"`` (attention sinks), so it is built with "eager".
* deepseek_v2 uses top-3 (not 2): with its max-prob group score and top_k <= topk_group, group-limited
  routing always equals plain top-k, so top-2 with topk_group 2 would not exercise it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "gpt_oss")
LAYOUTS = {f: ("fused",) if f == "gpt_oss" else ("fused", "per_expert") for f in FAMILIES}

VOCAB = 300
EOS_ID = 0  # the tokenizer's only special token "<|endoftext|>" is trained first, so it gets id 0
SPECIAL = "<|endoftext|>"

# Common to all families: tiny, fp32, and initializer_range 0.2 so that routing is far from uniform
# (router logits ~ N(0, 0.2^2 * 32) per expert after the RMSNorm).
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.2, tie_word_embeddings=False, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
    pad_token_id=EOS_ID, use_cache=True,
)

# Per-family structure, named with the 5.24 config keys (configuration_<family>.py).
_FAMILY = {
    # MixtralConfig: num_local_experts (alias num_experts); every layer is MoE; experts use intermediate_size.
    "mixtral": dict(
        num_hidden_layers=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
    ),
    # Qwen2MoeConfig: layer i is MoE iff i not in mlp_only_layers and (i+1) % decoder_sparse_step == 0;
    # dense layers use intermediate_size; shared expert + sigmoid shared_expert_gate in every MoE block.
    "qwen2_moe": dict(
        num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1,
        use_sliding_window=False, qkv_bias=True,
    ),
    # Qwen3MoeConfig: same block rules as qwen2_moe, no shared expert, q/k norms in attention.
    "qwen3_moe": dict(
        num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=True, mlp_only_layers=[], decoder_sparse_step=1, use_sliding_window=False, head_dim=8,
    ),
    # OlmoeConfig: experts use intermediate_size; every layer MoE; q/k norms.
    "olmoe": dict(
        num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=4, norm_topk_prob=False,
    ),
    # DeepseekV2Config: MLA attention (q_lora_rank None = V2-Lite style q_proj), layers < first_k_dense_replace
    # are dense (intermediate_size), shared experts of moe_intermediate_size * n_shared_experts.
    # top-3 > topk_group (as DeepSeek-V2's top-6 > topk_group 3): with a max-prob group score and
    # top_k <= topk_group the group limit can never change the choice, so top-2 would not test it.
    "deepseek_v2": dict(
        num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy",
        n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
        num_key_value_heads=4,
    ),
    # DeepseekV3Config: sigmoid router with e_score_correction_bias, noaux_tc group routing (built in).
    "deepseek_v3": dict(
        num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
        num_key_value_heads=4,
    ),
    # Glm4MoeConfig: same router as deepseek_v3, GQA attention with partial rotary (0.5 default).
    "glm4_moe": dict(
        num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.8, head_dim=8, attention_bias=True,
    ),
    # GptOssConfig: num_local_experts (alias num_experts), biased router, clamped SwiGLU experts with biases,
    # alternating sliding/full attention with sinks.
    "gpt_oss": dict(
        num_hidden_layers=2, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8,
        # the hub's YaRN rope, scaled so that factor * original_max_position_embeddings = 256
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64},
    ),
}


def make_config(family: str, **overrides):
    """The family's transformers config with the tiny structure above (``overrides`` win)."""
    from transformers import AutoConfig

    kw = {**_COMMON, **_FAMILY[family], **overrides}
    cfg = AutoConfig.for_model(family, **kw)
    cfg.dtype = torch.float32
    # gpt_oss has attention sinks and refuses sdpa in 5.24 ("does not support ... scaled_dot_product_attention")
    cfg._attn_implementation = "eager" if family == "gpt_oss" else "sdpa"
    cfg._experts_implementation = "eager"
    return cfg


def moe_layers(model) -> list[int]:
    """Indices of the decoder layers whose ``mlp`` is a routed MoE block (it has ``experts``)."""
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def router_of(mlp):
    """The router module of an MoE block: ``mlp.router`` for gpt_oss, ``mlp.gate`` otherwise."""
    return mlp.router if hasattr(mlp, "router") else mlp.gate


@torch.no_grad()
def _randomise_biases(model, family: str, seed: int) -> None:
    """Give the zero-initialised routing/expert biases seeded non-zero values (see module docstring)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    for i in moe_layers(model):
        mlp = model.model.layers[i].mlp
        if family in ("deepseek_v3", "glm4_moe"):
            b = mlp.gate.e_score_correction_bias
            b.copy_(torch.rand(b.shape, generator=g, dtype=torch.float64).mul(0.6).sub(0.3).to(b.dtype))
        if family == "gpt_oss":  # router logit bias ~ N(0, 0.5^2) (logits ~ N(0, 1.1^2)); expert biases N(0, 0.1^2)
            for p, std in ((mlp.router.bias, 0.5), (mlp.experts.gate_up_proj_bias, 0.1), (mlp.experts.down_proj_bias, 0.1)):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul(std).to(p.dtype))


def make_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised ``<Family>ForCausalLM`` (eval, fp32, sdpa attention, eager experts).

    Deterministic given ``seed``: weights come from ``torch.manual_seed(seed)`` and the biases from a
    generator seeded with ``10000 + seed``.
    """
    from transformers import AutoModelForCausalLM

    cfg = make_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomise_biases(model, family, seed)
    return model.eval()


def save_checkpoint(family: str, out_dir, layout: str = "fused", seed: int = 0, tokenizer=None, **overrides) -> Path:
    """Build :func:`make_model` and ``save_pretrained`` it in ``layout`` (see module docstring); returns the dir."""
    if layout not in LAYOUTS[family]:
        raise ValueError(f"{family} has no {layout!r} layout (has {LAYOUTS[family]})")
    out = Path(out_dir)
    model = make_model(family, seed=seed, **overrides)
    model.save_pretrained(out, save_original_format=(layout == "per_expert"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _stdlib_lines(n_lines: int = 600) -> list[str]:
    """Non-blank lines of the interpreter's own asyncio sources, in sorted file order (offline, fixed)."""
    import asyncio

    lines = []
    for f in sorted(Path(asyncio.__file__).parent.glob("*.py")):
        lines += [ln.rstrip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(lines) >= n_lines:
            break
    return lines[:n_lines]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE (as pruning/models/tiny.py:train_tokenizer does) and serialise it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_stdlib_lines(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` (id 0) as eos/bos/unk/pad.

    Trained on a few hundred lines of the standard library's asyncio sources, so it needs no network and
    is the same on every run. The same recipe as ``pruning.models.tiny.train_tokenizer`` (copied, not
    imported, so these fixtures do not move when the package under test does).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIAL, bos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL
    )
