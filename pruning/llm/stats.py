"""Calibration statistics of a causal LM's prunable linears and the per-layer sensitivity profile.

* :func:`prunable_linears` - every linear map inside the decoder blocks (attention and MLP
  projections), with short names such as ``"0.q_proj"`` (block index + leaf name): ``nn.Linear`` (and its
  subclasses; weight ``[out, in]``) and transformers' ``Conv1D`` of the GPT-2 family (weight stored
  ``[in, out]``). :attr:`LinearInfo.weight` is always the ``[out, in]`` view, and every flat index used by
  the selection, the masks and the persisted steps is into that view (``row * in + col``);
  :meth:`LinearInfo.storage_index` maps it to the stored tensor (the identity for ``nn.Linear``).
* :func:`activation_norms` - ``||X_j||_2`` of every input feature of every prunable linear over the
  calibration tokens, collected by forward hooks on the linears' inputs (the hooks return None, so the
  forward pass is unchanged; they are removed afterwards).
* :func:`gradient_scores` - ``mean |W * dL/dW|`` per layer from one backward pass of the calibration
  loss (accumulated over micro-batches, which equals one backward of the summed loss).
* :func:`build_profile` - Wanda score, gradient score and OWL outlier ratio per layer, the first two
  normalised as z-scores across layers and combined.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from pydantic import BaseModel, Field
from torch import nn

__all__ = [
    "LinearInfo", "linear_map_kind", "prunable_linears", "calibration_windows", "activation_norms", "gradient_scores",
    "LayerStats", "SensitivityProfile", "build_profile", "zscores",
]


@dataclass(frozen=True)
class LinearInfo:
    name: str  # short: "<block>.<leaf>", e.g. "0.q_proj"
    module_name: str  # full: "model.layers.0.self_attn.q_proj"
    block: int
    kind: str  # leaf name: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, c_attn, ...
    module: nn.Module  # nn.Linear, or a Conv1D-style module whose weight is stored [in, out]
    transposed: bool = False  # weight stored [in, out] (transformers' Conv1D)

    @property
    def params(self) -> int:
        return self.module.weight.numel()

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``[out, in]`` (a view of the parameter: writes go through)."""
        w = self.module.weight
        return w.t() if self.transposed else w

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    def storage_index(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat indices into :attr:`weight` (``row * in + col``) -> flat indices into the stored parameter."""
        if not self.transposed:
            return flat
        n_in, n_out = self.module.weight.shape
        return (flat % n_in) * n_out + flat // n_in


def linear_map_kind(module: nn.Module) -> str | None:
    """``"linear"`` for ``nn.Linear`` (and subclasses), ``"conv1d"`` for transformers' ``Conv1D`` (GPT-2 family:
    ``y = x @ W + b`` with ``W`` stored ``[in, out]``), else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    w = getattr(module, "weight", None)
    if (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(module, "nf", None) == w.shape[1]):
        return "conv1d"
    return None


def _decoder_blocks(model: nn.Module) -> Sequence[nn.Module] | None:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj):
            return obj
    return None


def prunable_linears(model: nn.Module) -> dict[str, LinearInfo]:
    """Ordered ``{short name: LinearInfo}`` of the linear maps inside the decoder blocks.

    Embeddings, the LM head and norms are never pruned. Models without a recognisable block list fall
    back to every linear map except the output embedding.
    """
    full_names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, LinearInfo] = {}
    blocks = _decoder_blocks(model)
    if blocks is not None:
        for b, block in enumerate(blocks):
            for sub, mod in block.named_modules():
                kind = linear_map_kind(mod)
                if kind is not None:
                    leaf = sub.rsplit(".", 1)[-1]
                    name = f"{b}.{leaf}"
                    if name in out:  # same leaf name twice in one block: use the dotted path
                        name = f"{b}.{sub}"
                    out[name] = LinearInfo(name, full_names[id(mod)], b, leaf, mod, kind == "conv1d")
        return out
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for full, mod in model.named_modules():
        kind = linear_map_kind(mod)
        if kind is not None and mod is not head:
            m = re.search(r"\.(\d+)\.", f".{full}.")
            b = int(m.group(1)) if m else 0
            out[full] = LinearInfo(full, full, b, full.rsplit(".", 1)[-1], mod, kind == "conv1d")
    return out


def calibration_windows(stream: torch.Tensor, n_sequences: int = 16, seq_len: int = 128, seed: int = 0) -> torch.Tensor:
    """``[n_sequences, seq_len]`` random windows of a token stream (deterministic for ``seed``)."""
    if len(stream) <= seq_len:
        raise ValueError(f"calibration stream of {len(stream)} tokens is shorter than seq_len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n_sequences,), generator=g)
    return stream[starts[:, None] + torch.arange(seq_len)[None, :]]


def _batches(tokens: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    for i in range(0, len(tokens), batch_size):
        yield tokens[i: i + batch_size]


@torch.no_grad()
def activation_norms(model: nn.Module, tokens: torch.Tensor, layers: dict[str, LinearInfo] | None = None,
                     batch_size: int = 8, max_sequences: int = 128) -> dict[str, torch.Tensor]:
    """``{name: ||X_j||_2}`` (float32, on CPU) over all calibration tokens, via forward hooks on inputs.

    At most ``max_sequences`` rows of ``tokens`` are used (bounded calibration cost); the forward passes run
    on the model's device in batches of ``batch_size`` sequences, the sums are accumulated there in float32.
    """
    layers = layers if layers is not None else prunable_linears(model)
    tokens = tokens[:max_sequences]
    sumsq: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs):  # forward pre-hook: sees the input, returns None (input unchanged)
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            acc = (x * x).sum(dim=0)
            sumsq[name] = acc if name not in sumsq else sumsq[name] + acc
            return None

        return hook

    for name, info in layers.items():
        handles.append(info.module.register_forward_pre_hook(make_hook(name)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in _batches(tokens, batch_size):
            model(input_ids=b.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: sumsq[n].sqrt().cpu() for n in layers if n in sumsq}


def gradient_scores(model: nn.Module, tokens: torch.Tensor, layers: dict[str, LinearInfo] | None = None,
                    batch_size: int = 8, max_sequences: int = 64) -> dict[str, float]:
    """``{name: mean |W * dL/dW|}`` from the calibration language-modelling loss (one backward).

    Only the prunable weights get gradients (others are frozen for the pass and restored after); the
    gradients are freed afterwards. Pruned (zero) weights contribute zero. Micro-batches of ``batch_size``
    sequences on the model's device (in its dtype, e.g. bf16 on CUDA), gradients accumulated.
    """
    layers = layers if layers is not None else prunable_linears(model)
    tokens = tokens[:max_sequences]
    targets = {id(i.module.weight) for i in layers.values()}
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in targets)
            p.grad = None
        n_batches = math.ceil(len(tokens) / batch_size)
        for b in _batches(tokens, batch_size):
            b = b.to(device)
            loss = model(input_ids=b, labels=b).loss / n_batches
            loss.backward()
        out = {}
        for name, info in layers.items():
            w = info.module.weight
            g = w.grad if w.grad is not None else torch.zeros_like(w)
            out[name] = float((w.detach().float() * g.float()).abs().mean())
    finally:
        for p, rg in saved.items():
            p.grad = None
            p.requires_grad_(rg)
        model.train(was_training)
    return out


def zscores(values: Sequence[float]) -> list[float]:
    """(x - mean) / std (population std); all zeros when the values are constant."""
    n = len(values)
    if n == 0:
        return []
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return [0.0 if std == 0 else (v - mean) / std for v in values]


class LayerStats(BaseModel):
    """One prunable linear in the sensitivity profile (higher z = more important, prune later)."""

    name: str
    block: int
    kind: str
    params: int
    wanda: float = Field(description="mean |W_ij| * ||X_j||_2 over the layer's weights")
    grad: float = Field(description="mean |W_ij * dL/dW_ij| (first-order loss change of removing a weight)")
    outlier_ratio: float = Field(description="fraction of Wanda scores > M x the layer mean (OWL's LOD)")
    z_wanda: float
    z_grad: float
    z_combined: float = Field(description="w * z_wanda + (1 - w) * z_grad")


class SensitivityProfile(BaseModel):
    layers: list[LayerStats]
    wanda_weight: float = 0.5
    outlier_m: float = 5.0
    calibration_sequences: int
    calibration_seq_len: int

    def by_name(self) -> dict[str, LayerStats]:
        return {l.name: l for l in self.layers}

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    def table(self) -> list[dict]:
        return [l.model_dump() for l in self.layers]


def build_profile(layers: dict[str, LinearInfo], norms: dict[str, torch.Tensor], grads: dict[str, float], *,
                  wanda_weight: float = 0.5, outlier_m: float = 5.0, calibration_sequences: int = 0,
                  calibration_seq_len: int = 0) -> SensitivityProfile:
    """Combine Wanda and gradient scores into z-scores across layers."""
    names = list(layers)
    wanda, outl = [], []
    for n in names:
        w = layers[n].weight.detach().float().abs() * norms[n].to(layers[n].weight.device)[None, :]
        mean = float(w.mean())
        wanda.append(mean)
        outl.append(float((w > outlier_m * mean).float().mean()) if mean > 0 else 0.0)
    gvals = [grads[n] for n in names]
    zw, zg = zscores(wanda), zscores(gvals)
    rows = [LayerStats(name=n, block=layers[n].block, kind=layers[n].kind, params=layers[n].params,
                       wanda=wanda[i], grad=gvals[i], outlier_ratio=outl[i], z_wanda=zw[i], z_grad=zg[i],
                       z_combined=wanda_weight * zw[i] + (1 - wanda_weight) * zg[i])
            for i, n in enumerate(names)]
    return SensitivityProfile(layers=rows, wanda_weight=wanda_weight, outlier_m=outlier_m,
                              calibration_sequences=calibration_sequences, calibration_seq_len=calibration_seq_len)
