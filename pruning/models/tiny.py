"""The embedded default model: a byte-level BPE tokenizer and a tiny Mixtral trained on the CPU.

The result is saved with ``save_pretrained`` (model and tokenizer), so every later step loads it exactly
like a hub checkpoint.
"""
from __future__ import annotations

import math

import torch

SPECIAL = "<|endoftext|>"


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL, bos_token=SPECIAL, unk_token=SPECIAL)


def build_config(vocab_size: int, arch: dict, seqlen: int, eos_id: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"],
        num_local_experts=arch["num_experts"],
        num_experts_per_tok=arch["top_k"],
        router_aux_loss_coef=arch["router_aux_loss_coef"],
        max_position_embeddings=max(seqlen, 512),
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )


def train(config, stream: torch.Tensor, cfg: dict, log=print):
    """Train from scratch with AdamW, linear warm-up + cosine decay, and the router auxiliary loss.

    Batches are drawn at seeded random offsets of ``stream``; the same params give the same weights.
    """
    from transformers import MixtralForCausalLM

    torch.manual_seed(cfg["seed"])
    model = MixtralForCausalLM(config)
    model.config._experts_implementation = "eager"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    steps, warmup = cfg["steps"], max(1, int(cfg["warmup_frac"] * cfg["steps"]))

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(cfg["seed"])
    seqlen, bs = cfg["seqlen"], cfg["batch_size"]
    history = []
    from tqdm import tqdm

    bar = tqdm(range(steps), desc="train tiny MoE", unit="step", mininterval=5)
    for step in bar:
        starts = torch.randint(0, stream.numel() - seqlen - 1, (bs,), generator=g)
        ids = torch.stack([stream[s : s + seqlen] for s in starts.tolist()])
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            lm = (out.loss - config.router_aux_loss_coef * out.aux_loss).item()
            history.append({"step": step, "lm_loss": lm, "aux_loss": out.aux_loss.item()})  # no wall times: same bytes every run
            bar.set_postfix(lm_loss=f"{lm:.3f}", aux=f"{out.aux_loss.item():.3f}")
    model.eval()
    return model, history
