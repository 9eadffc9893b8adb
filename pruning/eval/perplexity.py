"""Token perplexity over fixed-length non-overlapping windows (the Wanda/SparseGPT protocol).

This is *token* perplexity: exp(mean next-token NLL) over every prediction inside each window. It is
not lm-eval's word perplexity and the two must never share a column.
"""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def token_nll(model, windows: torch.Tensor, batch_size: int = 8, device="cpu", progress: bool = False):
    """(sum of NLL, number of predicted tokens) over the windows (n, seqlen)."""
    total, count = 0.0, 0
    batches = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch")
    for i in batches:
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += ids[:, 1:].numel()
    return total, count


def perplexity(model, windows, batch_size=8, device="cpu", progress=False) -> float:
    total, count = token_nll(model, windows, batch_size, device, progress)
    return math.exp(total / count)


def unigram_perplexity(train_stream: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on the training stream, on the same
    predicted positions as ``token_nll`` (every token of each window but the first)."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1)
    return math.exp(-logp[targets].mean().item())
