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


@torch.no_grad()
def streamed_nll(source, windows: torch.Tensor, batch_size: int = 8, group: int | None = None, progress: bool = False):
    """``token_nll`` with decoder layers from a layer source (``pruning.models.layer_source``), for a model that does
    not fit: windows go in groups of ``group`` (default: as many as a quarter of the free memory holds), and each
    decoder layer is read once per group."""
    from ..calib.stream import embed, run_layer
    from ..models.layer_source import free_bytes

    n, seqlen = windows.shape
    if group is None:
        per_window = seqlen * source.config.hidden_size * 4 * 3  # hidden states in and out, and the attention's
        group = max(batch_size, free_bytes(source.device) // 4 // per_window)
    total, count = 0.0, 0
    layers = range(source.adapter.num_layers)
    steps = [(g, i) for g in range(0, n, group) for i in layers]
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="perplexity (streamed layers)", unit="layer")
    hidden = None
    for g, i in steps:
        ids = windows[g : g + group]
        if i == 0:
            hidden = embed(source, ids, batch_size)
        with source.layer(i) as layer:
            hidden = run_layer(layer, hidden, source.context(seqlen, i), batch_size)
        if i == layers[-1]:
            for b in range(0, ids.shape[0], batch_size):
                logits = source.head(hidden[b : b + batch_size]).float()
                tgt = ids[b : b + batch_size, 1:].to(logits.device)
                total += nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                     reduction="sum").item()
                count += tgt.numel()
    return total, count


def perplexity(model_or_source, windows, batch_size=8, device="cpu", progress=False) -> float:
    """Token perplexity of a model, or of a layer source: a resident one runs the model's own forward, one that
    builds layers from the shards streams them (``streamed_nll``)."""
    from ..models.layer_source import ResidentSource, ShardSource

    if isinstance(model_or_source, ShardSource):
        total, count = streamed_nll(model_or_source, windows, batch_size, progress=progress)
    else:
        model = model_or_source.model if isinstance(model_or_source, ResidentSource) else model_or_source
        total, count = token_nll(model, windows, batch_size, device, progress)
    return math.exp(total / count)


def unigram_perplexity(train_stream: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fit on the training stream, on the same
    predicted positions as ``token_nll`` (every token of each window but the first)."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1)
    return math.exp(-logp[targets].mean().item())
