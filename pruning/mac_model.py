"""Exact MAC model: Torch-Pruning's counting hooks replayed on predicted shapes.

One profiling forward pass records every layer Torch-Pruning's ``count_ops_and_params`` counts, with
its input/output shapes and which prunable groups set each channel dimension. Predicting the MACs of
an allocation then only rewrites those shapes and re-runs the same counting hooks on ``meta`` tensors:
no weights are touched, and the result equals the count on the really pruned model.

A channel dimension can be set by several groups (the input of a layer after ``torch.cat``: DenseNet,
Inception, DLA) and a member can lose a different number of units per root unit (a split of the root's
channels: CSPNet, Res2Net): each dimension is a sum of ``(group, weight)`` terms, the weight being
either the units per root unit or, for splits, the count per root index (taken from Torch-Pruning's
``root_idxs``). Shapes the trace cannot follow (slices, reshapes) are not guessed: the space checks
the prediction against a measured cut (:attr:`MacModel.exact`) and the solver measures where it differs.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.utils import op_counter

from pruning.groups import Allocation, GroupInfo, pruned_root_indices

_Term = tuple[int, "int | torch.Tensor"]  # (group index, units removed per root unit, or per root index)
_Var = tuple[_Term, ...]  # a channel dimension: base minus the sum of its terms
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class _CountedLayer:
    name: str
    hook: Callable
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_var: tuple[int, _Var] | None  # (dim, var) of the input tensor
    out_var: tuple[int, _Var] | None
    attrs: dict  # attributes the hook reads, base values
    attr_vars: dict  # attribute -> var (channel attrs) or ("heads", group)


def attention_modules(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """qkv linear -> attention module, for timm-style attention blocks."""
    return {m.qkv: m for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}


def _channel_dim(m: nn.Module) -> int:
    return 1 if isinstance(m, (*_CONVS, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) else -1


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape))


class _GroupVars:
    """Which groups set which channel dimension: member module -> terms, attention module -> head group."""

    def __init__(self, model: nn.Module, groups: list[GroupInfo]):
        name_of = {m: n for n, m in model.named_modules()}
        module_of = dict(model.named_modules())
        out: dict[str, list[_Term]] = {}
        inp: dict[str, list[_Term]] = {}
        for g in groups:
            weights = g.member_weights or [max(1, round(length / g.full)) for _, _, length in g.members]
            for (member, is_out, _), w in zip(g.members, weights):
                (out if is_out else inp).setdefault(member, []).append((g.index, w))
        self.out_var: dict[str, _Var] = {k: tuple(v) for k, v in out.items()}
        self.in_var: dict[str, _Var] = {k: tuple(v) for k, v in inp.items()}
        self.attn_of_qkv = attention_modules(model)
        self.head_group: dict[str, int] = {}
        for g in groups:
            if g.is_attention:
                for member, is_out, _ in g.members:
                    if is_out and module_of.get(member) in self.attn_of_qkv:
                        self.head_group[name_of[self.attn_of_qkv[module_of[member]]]] = g.index


_PERMUTES = (torch.permute, torch.Tensor.permute, torch.transpose, torch.Tensor.transpose, torch.swapaxes,
             torch.Tensor.swapaxes)
_RESHAPES = (torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.flatten, torch.Tensor.flatten)
_MOVES = _PERMUTES + _RESHAPES


class _FollowChannels(TorchFunctionMode):
    """Tensors made by torch ops keep the channels of a same-shaped operand (x + shortcut, x * gamma);
    ``torch.cat`` along a tracked channel dimension sums its inputs' terms."""

    def __init__(self, tracer: _LayerTracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        storage = self.tracer.storage
        if not isinstance(out, torch.Tensor) or _key(out) in storage:
            return out
        if func in (torch.cat, torch.concat) and args and isinstance(args[0], (list, tuple)):
            produced = self._cat(args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0), out)
            if produced is not None:
                storage[_key(out)] = produced
                self.tracer.keep_alive.append(out)
            return out
        if func in _MOVES and args and isinstance(args[0], torch.Tensor) and storage.get(_key(args[0])):
            moved = self._moved(func, args, storage[_key(args[0])], out)
            if moved is not None:
                storage[_key(out)] = moved
                self.tracer.keep_alive.append(out)
                return out
        for a in args:
            if isinstance(a, torch.Tensor) and a.shape == out.shape and storage.get(_key(a)) is not None:
                storage[_key(out)] = storage[_key(a)]
                self.tracer.keep_alive.append(out)
                break
        return out

    @staticmethod
    def _moved(func, args, src, out: torch.Tensor):
        """The channel dimension after a permute / transpose / reshape that keeps it whole (channels-last
        blocks and token layouts: MetaFormer, ConvNeXt, ``x.reshape(B, C, -1).transpose(1, 2)``)."""
        x, (d, var) = args[0], src
        d %= x.dim()
        if func in _RESHAPES:  # the channel dim survives if the dims before it keep their product
            before = math.prod(x.shape[:d])
            for k in range(out.dim()):
                if math.prod(out.shape[:k]) == before and out.shape[k] == x.shape[d]:
                    return (k, var)
            return None
        if func in (torch.permute, torch.Tensor.permute):
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            dims = [int(i) % x.dim() for i in dims]
            return (dims.index(d), var) if len(dims) == x.dim() else None
        if len(args) < 3:
            return None
        a, b = int(args[1]) % x.dim(), int(args[2]) % x.dim()
        return ({a: b, b: a}.get(d, d), var)

    def _cat(self, tensors, dim: int, out: torch.Tensor):
        dim = dim % out.dim()
        terms: list = []
        for t in tensors:
            src = self.tracer.storage.get(_key(t)) if isinstance(t, torch.Tensor) else None
            if src is None:
                continue
            d, var = src
            if d % t.dim() != dim:
                return None  # a tracked channel dimension that is not the concatenated one
            terms.extend(var)
        return (dim, tuple(terms)) if terms else None


class _LayerTracer:
    """One forward pass with hooks: follows which group sets each tensor's channels and records counted layers."""

    def __init__(self, model: nn.Module, gv: _GroupVars):
        self.model, self.gv = model, gv
        self.name_of = {m: n for n, m in model.named_modules()}
        self.layers: list[_CountedLayer] = []
        self.storage: dict[tuple[int, tuple], tuple[int, _Var] | None] = {}
        self.keep_alive: list[torch.Tensor] = []
        self.counted_parents: set[str] = set()

    def trace(self, example: torch.Tensor) -> list[_CountedLayer]:
        model = self.model
        handles = [m.register_forward_hook(self.hook) for m in model.modules() if m is not model]
        try:
            with torch.no_grad(), _FollowChannels(self):
                model.eval()(example)
        finally:
            for h in handles:
                h.remove()
        # children of a counted parent may have been appended before the parent's hook ran
        return [l for l in self.layers if not any(l.name.startswith(p + ".") for p in self.counted_parents)]

    def hook(self, mod, inputs, output):
        name = self.name_of.get(mod)
        if name is None or not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
            return None
        x = inputs[0]
        self.keep_alive.extend([x, output])
        src = self.storage.get(_key(x))
        self._propagate(mod, name, output, src)
        if not op_counter.is_supported_instance(mod):
            return None
        if any(name.startswith(p + ".") for p in self.counted_parents):
            return None  # the counter sums a supported parent, not its children
        self._record(mod, name, x, output, src)
        return None

    def _propagate(self, mod: nn.Module, name: str, output: torch.Tensor, src) -> None:
        """Remember which group sets the channels of ``output``."""
        if name in self.gv.out_var:
            produced = (_channel_dim(mod), self.gv.out_var[name])
        elif isinstance(mod, (nn.Conv2d, nn.Linear, nn.Conv1d, nn.Conv3d)):
            produced = None  # a layer whose outputs are never pruned
        else:
            produced = src  # elementwise / pooling / norm: channels follow the input
        if not any(True for _ in mod.children()):  # containers would overwrite what their leaves produced
            self.storage[_key(output)] = produced

    def _record(self, mod: nn.Module, name: str, x: torch.Tensor, output: torch.Tensor, src) -> None:
        """Append the counted layer ``mod`` with the attributes its counting hook reads."""
        ov = self.gv.out_var.get(name)
        if isinstance(mod, (*_CONVS, nn.ConvTranspose2d)):
            attrs, attr_vars, in_v = self._conv(mod, self.gv.in_var.get(name), ov)
        elif isinstance(mod, nn.Linear):
            iv = self.gv.in_var.get(name)
            attrs = dict(bias=mod.bias, in_features=mod.in_features, out_features=mod.out_features)
            attr_vars, in_v = {}, ((-1, iv) if iv else None)
        elif mod in self.gv.attn_of_qkv.values():
            attrs, attr_vars, in_v = self._attention(mod, name)
        else:
            attrs = {a: getattr(mod, a) for a in ("affine", "elementwise_affine") if hasattr(mod, a)}
            attr_vars, in_v = {}, src
        out_v = (_channel_dim(mod), ov) if ov else (None if isinstance(mod, (nn.Conv2d, nn.Linear)) else in_v)
        self.layers.append(_CountedLayer(name, op_counter.MODULES_MAPPING[type(mod)], tuple(x.shape),
                                         tuple(output.shape), in_v, out_v, attrs, attr_vars))

    @staticmethod
    def _conv(mod: nn.Module, iv: _Var | None, ov: _Var | None) -> tuple[dict, dict, tuple | None]:
        attrs = dict(kernel_size=mod.kernel_size, in_channels=mod.in_channels,
                     out_channels=mod.out_channels, groups=mod.groups, bias=mod.bias)
        attr_vars = {}
        depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
        if depthwise and not iv:
            iv = ov  # a depthwise conv is pruned as one unit: in follows out
        if iv:
            attr_vars["in_channels"] = iv
        if ov:
            attr_vars["out_channels"] = ov
        if depthwise and (ov or iv):
            attr_vars["groups"] = ov or iv
        return attrs, attr_vars, ((1, iv) if iv else None)

    def _attention(self, mod: nn.Module, name: str) -> tuple[dict, dict, tuple | None]:
        qkv = mod.qkv
        attrs = dict(num_heads=mod.num_heads, qkv_out=qkv.out_features, qkv_bias=qkv.bias)
        attr_vars = {}
        qname = self.name_of[qkv]
        if qname in self.gv.out_var:
            attr_vars["qkv_out"] = self.gv.out_var[qname]
        if name in self.gv.head_group:
            attr_vars["num_heads"] = ("heads", self.gv.head_group[name])
        self.counted_parents.add(name)
        return attrs, attr_vars, ((-1, self.gv.in_var[qname]) if qname in self.gv.in_var else None)


class _Removed:
    """Units a term removes under one allocation (root counts for int weights, index masks for tensors)."""

    def __init__(self, allocation: Allocation, groups: list[GroupInfo]):
        self.allocation, self.groups = allocation, groups
        self.count = {i: groups[i].full - groups[i].kept(c) for i, c in allocation.items()}
        self._masks: dict[int, torch.Tensor] = {}

    def __call__(self, term: _Term) -> int:
        g, w = term
        n = self.count.get(g, 0)
        if not n:
            return 0
        if isinstance(w, int):
            return w * n
        mask = self._masks.get(g)
        if mask is None:
            mask = torch.zeros(self.groups[g].full, dtype=torch.bool)
            mask[pruned_root_indices(self.groups[g], self.allocation[g])] = True
            self._masks[g] = mask
        return int(w[mask].sum())


class MacPredictionError(ValueError):
    """The analytic MAC model cannot predict this allocation (the solver measures instead)."""


class MacModel:
    """Predicts ``count_ops_and_params`` MACs for any allocation, from one profiling forward pass.

    ``exact`` is set by the space once a measured cut confirmed (or refuted) the prediction.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, groups: list[GroupInfo]):
        self.base_macs = None
        self.exact: bool | None = None
        self.layers: list[_CountedLayer] = _LayerTracer(model, _GroupVars(model, groups)).trace(example)
        self._batch = example.shape[0]
        self.base_macs = self.macs({}, groups)

    def _new(self, base: int, var: _Var, removed: _Removed) -> int:
        n = base - sum(removed(t) for t in var)
        if n < 1:
            if self._strict:
                raise MacPredictionError(f"the MAC model removes {base - n} of {base} channels of a layer")
            return 1
        return n

    def macs(self, allocation: Allocation, groups: list[GroupInfo], strict: bool = True) -> int:
        """MACs per sample of the model pruned by ``allocation`` (same formula as Torch-Pruning's counter).

        A layer left with no channel means the model's groups overlap in a way the trace did not see:
        ``strict`` raises :class:`MacPredictionError`, otherwise the layer keeps one channel (a guide only).
        """
        self._strict = strict
        pruned_root = _Removed(allocation, groups)
        heads_left = {i: groups[i].ch_groups - c.heads for i, c in allocation.items()}
        total = 0
        for layer in self.layers:
            in_shape, out_shape = list(layer.in_shape), list(layer.out_shape)
            if layer.in_var:
                d, v = layer.in_var
                in_shape[d] = self._new(in_shape[d], v, pruned_root)
            if layer.out_var:
                d, v = layer.out_var
                out_shape[d] = self._new(out_shape[d], v, pruned_root)
            attrs = dict(layer.attrs)
            for a, v in layer.attr_vars.items():
                if v[0] == "heads":
                    attrs[a] = heads_left.get(v[1], attrs[a])
                else:
                    attrs[a] = self._new(attrs[a], v, pruned_root)
            if "qkv_out" in attrs:
                attrs["qkv"] = types.SimpleNamespace(out_features=attrs.pop("qkv_out"), bias=attrs.pop("qkv_bias"))
            shim = types.SimpleNamespace(__flops__=0, **attrs)
            x = torch.empty(in_shape, device="meta")
            y = torch.empty(out_shape, device="meta")
            layer.hook(shim, (x,), y)
            total += shim.__flops__
        return total // self._batch if total % self._batch == 0 else total / self._batch
