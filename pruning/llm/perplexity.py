"""Perplexity of a causal LM on a token stream: non-overlapping windows, mean token NLL, exp."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["windows", "mean_nll", "perplexity"]


def windows(stream: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """``[n, seq_len + 1]`` windows sharing their boundary token (each predicts ``seq_len`` tokens)."""
    if stream.ndim != 1:
        raise ValueError("expected a 1-D token stream")
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"token stream of {len(stream)} tokens is shorter than one window of {seq_len + 1}")
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None, :]
    return stream[idx]


@torch.no_grad()
def mean_nll(model: torch.nn.Module, stream: torch.Tensor, seq_len: int = 128, max_tokens: int | None = None,
             batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood (nats) over the windows of ``stream``."""
    was_training = model.training
    model.eval()
    win = windows(stream, seq_len, max_tokens)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, len(win), batch_size):
            b = win[i: i + batch_size].to(device)
            logits = model(input_ids=b[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += b[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


def perplexity(model: torch.nn.Module, stream: torch.Tensor, seq_len: int = 128, max_tokens: int | None = None,
               batch_size: int = 16) -> float:
    """``exp(mean NLL)``; ``inf`` on overflow (a collapsed model)."""
    nll = mean_nll(model, stream, seq_len, max_tokens, batch_size)
    return math.exp(nll) if nll < 700 else float("inf")
