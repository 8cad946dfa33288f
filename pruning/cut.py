"""What Torch-Pruning does not cut by itself, and replaying saved cuts.

A cut removes channels through Torch-Pruning's dependency graph; these helpers fix what the graph does
not own: parameters no pruner wraps (layer scales, position embeddings), Python attributes that spell
widths (MetaFormer layer-scale shapes, MixNet split sizes), and timm's ``BlurPool2d`` filter. The same
repairs run when a space cuts a model (:mod:`pruning.space`), on probe copies (:mod:`pruning.probe`) and
when a saved bundle is rebuilt (:class:`ReplayGraph`).
"""
from __future__ import annotations

import math

import torch
import torch_pruning as tp
from timm.layers import BlurPool2d
from torch import nn

from pruning.errors import PruningError
from pruning.graph import patched


def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters no Torch-Pruning pruner owns (layer scales, position embeddings, class tokens, ...),
    registered with their channel dimension: the last non-singleton one (``gamma`` (C,), ``(C,1,1)``,
    ``pos_embed`` (1,N,C)). Ones that turn out not to be channel-indexed (per-head temperatures, relative
    position tables) are dropped from their groups by :func:`iter_groups`."""
    boxes = tp.pruner.function.PrunerBox
    wrapped = set()
    for m in model.modules():
        t = tp.ops.module2type(m)
        if t in boxes and t != tp.ops.OPTYPE.ELEMENTWISE:
            wrapped.update(id(p) for p in m.parameters())
    out = []
    for p in model.parameters():
        dims = [i for i, s in enumerate(p.shape) if s > 1]
        if id(p) not in wrapped and dims:
            out.append((p, dims[-1]))
    return out


def extra_channel_params(group, DG: tp.DependencyGraph) -> list[tuple[nn.Module, str, int, list[int]]]:
    """Before a cut: per-output-channel parameters of conv/linear *subclasses* TP does not prune (``gain``)."""
    out = []
    for dep, idxs in group:
        m = dep.target.module
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or type(m) in (nn.Conv2d, nn.Linear):
            continue
        if not DG.is_out_channel_pruning_fn(dep.handler):
            continue
        width = m.weight.shape[0]
        for name, p in m.named_parameters(recurse=False):
            if name not in ("weight", "bias") and p.dim() and p.shape[0] == width:
                out.append((m, name, width, list(idxs)))
    return out


def prune_extra_params(extra: list[tuple[nn.Module, str, int, list[int]]]) -> None:
    """After a cut: drop the same output channels from the parameters found by :func:`extra_channel_params`."""
    for m, name, width, idxs in extra:
        p = getattr(m, name)
        if p.shape[0] != width:
            continue
        keep = sorted(set(range(width)) - set(idxs))
        setattr(m, name, nn.Parameter(p.data[keep], requires_grad=p.requires_grad))


def shape_attributes(model: nn.Module) -> list[tuple]:
    """Python attributes that spell channel widths Torch-Pruning does not update, to re-sync after a cut:

    - a tuple that is a module's own parameter's shape (``Scale.shape = (C, 1, 1)`` of MetaFormer layer scales),
    - a list/tuple of split sizes equal to the input widths of the module's conv children
      (``MixedConv2d.splits`` of MixNet: ``torch.split(x, self.splits, 1)``).
    """
    out = []
    for m in model.modules():
        if _width_free_blur(m):
            out.append(("blur", m, "channels", "filt", m.channels))
            continue
        params = list(m.named_parameters(recurse=False))
        convs = [c for c in m.modules() if c is not m and isinstance(c, nn.modules.conv._ConvNd)]
        for attr, value in vars(m).items():
            if attr.startswith("_") or not isinstance(value, (tuple, list)) or not value:
                continue
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                continue
            if convs and len(convs) == len(value) > 1 and [c.in_channels for c in convs] == list(value):
                out.append(("splits", m, attr, convs, type(value)))
                continue
            for pname, p in params:
                if isinstance(value, tuple) and math.prod(value) == p.numel() and p.dim() and max(p.shape) in value:
                    out.append(("shape", m, attr, pname, value))
                    break
    return out


def _width_free_blur(m: nn.Module) -> bool:
    """timm's ``BlurPool2d`` (TResNet, ResNet-AA anti-aliasing) with ``channels`` set: its depthwise filter
    buffer (non-persistent, rebuilt at creation) is one binomial kernel repeated per channel, so it can
    follow any input width instead."""
    filt = getattr(m, "filt", None)
    return (isinstance(m, BlurPool2d) and isinstance(m.channels, int) and isinstance(filt, torch.Tensor)
            and filt.shape[0] == m.channels)


def sync_shape_attributes(recorded: list[tuple]) -> None:
    """After a cut: rewrite the attributes recorded by :func:`shape_attributes` to the new widths."""
    for kind, m, attr, ref, value in recorded:
        if kind == "blur":  # one shared filter: let it follow the input width (timm's channels=None mode)
            m.channels, m.filt = None, m.filt[:1].clone()
            continue
        if kind == "splits":
            setattr(m, attr, value(c.in_channels for c in ref))
            continue
        p = getattr(m, ref)
        old = max(value)
        new = max(p.shape) if p.numel() != math.prod(value) else old
        if new != old:
            setattr(m, attr, tuple(new if v == old else v for v in value))


def cut_group(group, DG: tp.DependencyGraph, record_history: bool = True) -> None:
    """``group.prune()`` plus the extra per-channel parameters TP leaves alone."""
    extra = extra_channel_params(group, DG)
    group.prune(record_history=record_history)
    prune_extra_params(extra)


class ReplayGraph(tp.DependencyGraph):
    """A dependency graph whose ``load_pruning_history`` cuts like :meth:`pruning.space.PruningSpace.apply`
    (extra per-channel parameters, shape attributes), so saved pruned models rebuild with their shapes."""

    def load_pruning_history(self, pruning_history) -> None:
        self._pruning_history = pruning_history
        shapes = shape_attributes(self.model)
        modules = dict(self.model.named_modules())
        with patched():
            for module_name, is_out, idxs in pruning_history:
                module = modules[module_name]
                pruner = self.get_pruner_of_module(module)
                fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
                cut_group(self.get_pruning_group(module, fn, idxs), self, record_history=False)
        sync_shape_attributes(shapes)


def update_attention_attributes(model: nn.Module, num_heads: dict[str, int] | None = None) -> None:
    """After pruning, make timm attention bookkeeping (num_heads, head_dim, attn_dim, scale) match the qkv width."""
    alias_heads(model)
    for name, m in model.named_modules():
        if hasattr(m, "qkv") and hasattr(m, "num_heads") and hasattr(m, "head_dim"):
            if num_heads and name in num_heads:
                m.num_heads = num_heads[name]
            attn_dim = m.qkv.out_features // 3
            if attn_dim % m.num_heads:
                raise PruningError(f"attention width {attn_dim} is not divisible by {m.num_heads} heads")
            m.head_dim = attn_dim // m.num_heads
            for name in ("attn_dim", "attention_dim", "all_head_dim"):  # timm spells the width several ways
                if isinstance(getattr(m, name, None), int):
                    setattr(m, name, attn_dim)
            if isinstance(getattr(m, "heads", None), int):  # Hiera: heads, and dim_out is the inner width
                m.heads = m.num_heads
                if isinstance(getattr(m, "dim_out", None), int) and isinstance(getattr(m, "proj", None), nn.Linear):
                    m.dim_out = m.proj.in_features
            if hasattr(m, "scale"):
                m.scale = m.head_dim**-0.5


def alias_heads(model: nn.Module) -> None:
    """Attention modules that call their head count ``heads`` (Hiera) also get ``num_heads``, the name
    Torch-Pruning's head handling and :func:`update_attention_attributes` read."""
    for m in model.modules():
        if hasattr(m, "qkv") and not hasattr(m, "num_heads") and isinstance(getattr(m, "heads", None), int):
            m.num_heads = m.heads
