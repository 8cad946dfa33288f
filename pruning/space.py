"""The pruning space of a model: its prunable groups, their importance, and exact MAC prediction.

``PruningSpace.build`` traces the model once with Torch-Pruning's ``MetaPruner`` (dependency graph,
channel grouping, attention handling, isomorphic scopes) and scores every group once. After that,
turning a plan into per-group cuts (:meth:`PruningSpace.allocate`) and predicting the MACs of those
cuts (:meth:`PruningSpace.predict_macs`) touch no weights: the prediction re-runs Torch-Pruning's own
per-layer counting hooks on shapes, so it equals ``count_ops_and_params`` on the really pruned model.
Only :meth:`PruningSpace.apply` cuts weights, through ``step(interactive=True)`` so every group can be
inspected or vetoed before it is pruned.
"""
from __future__ import annotations

import copy
import math
import re
import warnings
from typing import Callable, Iterator

import torch
import torch_pruning as tp
from torch import nn

from pruning.errors import UserError
from pruning.groups import Allocation, Cut, GroupInfo
from pruning.importance import create_importance, has_gradients, needs_gradients
from pruning.mac_model import MacModel, attention_modules
from pruning.models import classifier, model_family
from pruning.plan import PruningPlan


class PruningError(UserError):
    """The model or plan cannot be pruned as asked (one-line message)."""


class _PlannedPruner(tp.pruner.MetaPruner):
    """A MetaPruner whose per-group pruning indices come from an explicit allocation."""

    def set_groups(self, groups: list[tuple[nn.Module, Callable, list[int]]]) -> None:
        self._planned = groups

    def _prune(self) -> Iterator:
        for module, fn, idxs in self._planned:
            group = self.DG.get_pruning_group(module, fn, idxs)
            if self.DG.check_pruning_group(group):
                yield group


def natural_key(name: str) -> list:
    """Sort key that puts blocks.2 before blocks.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _stage_names(model: nn.Module) -> list[str]:
    info = getattr(model, "feature_info", None)
    names = []
    if isinstance(info, list):
        names = [f["module"] for f in info if isinstance(f, dict) and f.get("module")]
    return sorted(set(names), key=len, reverse=True)


def _stage_of(name: str, stages: list[str]) -> str:
    for s in stages:
        if name == s or name.startswith(s + "."):
            return s
    parts = name.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def update_attention_attributes(model: nn.Module, num_heads: dict[str, int] | None = None) -> None:
    """After pruning, make timm attention bookkeeping (num_heads, head_dim, attn_dim, scale) match the qkv width."""
    for name, m in model.named_modules():
        if hasattr(m, "qkv") and hasattr(m, "num_heads") and hasattr(m, "head_dim"):
            if num_heads and name in num_heads:
                m.num_heads = num_heads[name]
            attn_dim = m.qkv.out_features // 3
            if attn_dim % m.num_heads:
                raise PruningError(f"attention width {attn_dim} is not divisible by {m.num_heads} heads")
            m.head_dim = attn_dim // m.num_heads
            if hasattr(m, "attn_dim"):
                m.attn_dim = attn_dim
            if hasattr(m, "scale"):
                m.scale = m.head_dim**-0.5


def stem_and_head(model: nn.Module) -> list[nn.Module]:
    """Layers that are never pruned: the first conv/linear the input meets, and the classifier."""
    keep = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            keep.append(m)
            break
    head = classifier(model)
    if head is not None:
        keep.append(head)
    return keep


# --------------------------------------------------------------------------------------------
# The space
# --------------------------------------------------------------------------------------------
class PruningSpace:
    """Groups, scores and MAC model of one model copy; the copy is what :meth:`apply` prunes."""

    def __init__(self, model: nn.Module, example: torch.Tensor, plan: PruningPlan, seed: int = 0):
        self.model = model
        self.example = example
        self.family = model_family(model)
        self.criterion = plan.importance
        if needs_gradients(plan.importance) and not has_gradients(model):
            raise PruningError("taylor importance needs calibration gradients on the model copy (run calibration first)")
        modules = dict(model.named_modules())
        ignored = stem_and_head(model)
        for name in plan.ignored_layers:
            if name not in modules:
                raise PruningError(f"ignored layer '{name}' is not a module of the model")
            ignored.append(modules[name])
        self.ignored_names = sorted({n for n, m in model.named_modules() if m in ignored})
        num_heads = {qkv: attn.num_heads for qkv, attn in attention_modules(model).items()}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Unwrapped parameters")
                self.pruner = _PlannedPruner(
                    model, example, importance=create_importance(plan.importance, seed), global_pruning=True,
                    isomorphic=True, ignored_layers=ignored, num_heads=num_heads, round_to=None,
                    root_module_types=[nn.Conv2d, nn.Linear],
                )
        except PruningError:
            raise
        except Exception as exc:
            raise PruningError(
                f"cannot trace {type(model).__name__} for structured pruning: {str(exc).splitlines()[0][:160]}"
            ) from None
        self.groups = self._collect_groups(model)
        if not self.groups:
            raise PruningError(f"{type(model).__name__} has no prunable channel groups")
        self.stages = sorted({g.stage for g in self.groups}, key=natural_key)
        self.mac_model = MacModel(model, example, self.groups)
        self.base_macs = self.mac_model.base_macs

    @classmethod
    def build(cls, model: nn.Module, example: torch.Tensor, plan: PruningPlan, seed: int = 0) -> "PruningSpace":
        """Analyse a *copy* of ``model`` (the copy will be pruned by :meth:`apply`)."""
        grads = {n: p.grad for n, p in model.named_parameters()}
        clone = copy.deepcopy(model)
        for n, p in clone.named_parameters():  # deepcopy does not copy .grad
            if grads[n] is not None:
                p.grad = grads[n].clone()
        return cls(clone, example, plan, seed)

    # -- analysis ---------------------------------------------------------------------------
    def _collect_groups(self, model: nn.Module) -> list[GroupInfo]:
        pr, DG = self.pruner, self.pruner.DG
        names = {m: n for n, m in model.named_modules()}
        stages = _stage_names(model)
        out: list[GroupInfo] = []
        for group in DG.get_all_groups(ignored_layers=pr.ignored_layers, root_module_types=pr.root_module_types):
            is_attn, qkv_layers = pr._is_atten_group(group)
            if is_attn:
                group = pr._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            ch_groups = pr._get_channel_groups(group)
            imp = pr.estimate_importance(group)
            if imp is None:
                continue
            imp = imp.detach().float().cpu()
            root_mod = group[0].dep.target.module
            root_is_out = DG.is_out_channel_pruning_fn(group[0].dep.handler)
            members = []
            for dep, idxs in group:
                m = dep.target.module
                if isinstance(m, nn.Module) and m in names and dep.target.type != tp.ops.OPTYPE.PARAMETER:
                    members.append((names[m], DG.is_out_channel_pruning_fn(dep.handler), len(idxs)))
            dim_imp = imp.view(ch_groups, -1).mean(0) if ch_groups > 1 else imp
            head_imp = imp.view(ch_groups, -1).mean(1) if is_attn else None
            scope = "iso"
            for dep, _ in group:
                tag = "out" if DG.is_out_channel_pruning_fn(dep.handler) else "in"
                scope += f"|{type(dep.source.module).__name__}_{tag}>{type(dep.target.module).__name__}_{tag}"
            root = names[root_mod]
            attn_of_qkv = attention_modules(model)
            attention = names[attn_of_qkv[qkv_layers[0]]] if is_attn and qkv_layers[0] in attn_of_qkv else None
            out.append(GroupInfo(
                index=len(out), root=root, root_is_out=root_is_out,
                kind=self._kind(root, members, is_attn, modules=dict(model.named_modules())),
                stage=_stage_of(root, stages), scope=scope, channels=len(dim_imp), ch_groups=ch_groups,
                importance=dim_imp, head_importance=head_imp, members=members, attention=attention,
            ))
        return out

    def _kind(self, root: str, members, is_attn: bool, modules) -> str:
        if self.family == "vit":
            if is_attn:
                return "qkv"
            if root.endswith("fc1") or ".mlp." in root + ".":
                return "mlp"
            return "proj"
        convs_out = [n for n, is_out, _ in members if is_out and isinstance(modules.get(n), (nn.Conv2d, nn.Linear))]
        return "residual" if len(convs_out) > 1 else "internal"

    # -- plans -> cuts ----------------------------------------------------------------------
    def validate(self, plan: PruningPlan) -> None:
        """Stage and kind names of the plan must exist in this model."""
        unknown = sorted(set(plan.stage_multipliers) - set(self.stages))
        if unknown:
            raise PruningError(f"unknown stages {unknown}; this model has {self.stages}")

    def _round_keep(self, keep: int, full: int, round_to: int) -> int:
        if keep >= full:
            return full
        keep = keep - keep % round_to if keep >= round_to else keep
        return max(keep, min(full, round_to), 1)

    def allocate(self, plan: PruningPlan, ratio: float | None = None) -> Allocation:
        """Per-group cuts for ``plan`` at base ratio ``ratio`` (default: the plan's own)."""
        ratio = plan.channel_ratio if ratio is None else ratio
        cap = plan.max_layer_ratio
        target: dict[int, float] = {}
        for g in self.groups:
            m = plan.multiplier(g.stage, g.kind)
            target[g.index] = min(cap, ratio * m) if m > 0 else 0.0
        dims: dict[int, int] = {}
        if plan.allocation == "uniform":
            for g in self.groups:
                dims[g.index] = int(g.channels * target[g.index])
        else:
            scopes: dict[str, list[GroupInfo]] = {}
            for g in self.groups:
                if target[g.index] > 0:
                    scopes.setdefault(g.scope, []).append(g)
            for members in scopes.values():
                n_total = int(sum(g.channels * target[g.index] for g in members))
                if n_total <= 0:
                    continue
                scores, owner = [], []
                for g in members:
                    m = plan.multiplier(g.stage, g.kind)
                    scores.append(g.importance / m)
                    owner.append(torch.full((g.channels,), g.index, dtype=torch.long))
                scores_t, owner_t = torch.cat(scores), torch.cat(owner)
                order = torch.argsort(scores_t, stable=True)[:n_total]
                counts = torch.bincount(owner_t[order], minlength=len(self.groups))
                for g in members:
                    dims[g.index] = min(int(counts[g.index]), int(g.channels * cap))
        alloc: Allocation = {}
        for g in self.groups:
            d = dims.get(g.index, 0)
            round_to = plan.round_to
            min_keep = 1
            if g.is_attention:
                min_keep = min(g.channels, plan.min_head_dim)
            keep = self._round_keep(g.channels - d, g.channels, round_to) if d > 0 else g.channels
            # rounding down must not break the per-layer cap: keep at least ceil((1-cap)*C), rounded up
            cap_keep = math.ceil(g.channels * (1 - cap) - 1e-9)
            cap_keep = min(g.channels, -(-cap_keep // round_to) * round_to)
            keep = max(keep, min_keep, cap_keep)
            heads = 0
            if g.is_attention:
                hm = plan.multiplier(g.stage, "head")
                heads = min(int(g.ch_groups * min(cap, ratio * hm)), g.ch_groups - 1) if hm > 0 else 0
            cut = Cut(dims=g.channels - keep, heads=heads)
            if cut.dims or cut.heads:
                alloc[g.index] = cut
        return alloc

    def predict_macs(self, allocation: Allocation) -> float:
        """Exact MACs of the model after ``allocation`` without touching weights."""
        return self.mac_model.macs(allocation, self.groups)

    def max_reduction_macs(self, plan: PruningPlan) -> float:
        """Smallest MACs reachable with this plan shape (every group at its cap)."""
        return self.predict_macs(self.allocate(plan, ratio=0.999 / max(1e-6, self._min_positive_multiplier(plan))))

    def _min_positive_multiplier(self, plan: PruningPlan) -> float:
        ms = [plan.multiplier(g.stage, g.kind) for g in self.groups]
        ms = [m for m in ms if m > 0]
        return min(ms) if ms else 1.0

    # -- cutting ----------------------------------------------------------------------------
    def pruning_indices(self, g: GroupInfo, cut: Cut) -> list[int]:
        """Root-dimension indices removed by ``cut``: lowest-importance units (and heads), replicated per group."""
        order = torch.argsort(g.importance, stable=True)
        dim_idx = set(order[: cut.dims].tolist())
        heads = set()
        if cut.heads and g.head_importance is not None:
            heads = set(torch.argsort(g.head_importance, stable=True)[: cut.heads].tolist())
        idxs = [h * g.channels + j for h in range(g.ch_groups) for j in range(g.channels) if h in heads or j in dim_idx]
        return idxs

    def _planned(self, model: nn.Module, DG: tp.DependencyGraph, allocation: Allocation) -> list:
        """``(root module, pruning fn, indices)`` per cut group of ``allocation``, on ``model`` and its graph ``DG``."""
        modules = dict(model.named_modules())
        planned = []
        for i, cut in sorted(allocation.items()):
            g = self.groups[i]
            root = modules[g.root]
            pruner_fn = DG.get_pruner_of_module(root)
            fn = pruner_fn.prune_out_channels if g.root_is_out else pruner_fn.prune_in_channels
            planned.append((root, fn, self.pruning_indices(g, cut)))
        return planned

    def interactive(self, allocation: Allocation) -> Iterator:
        """Yield Torch-Pruning groups for ``allocation`` one by one; call ``group.prune()`` to cut (or skip to veto)."""
        self.pruner.set_groups(self._planned(self.model, self.pruner.DG, allocation))
        return self.pruner.step(interactive=True)

    def apply(self, allocation: Allocation, veto: Callable[[object], bool] | None = None) -> nn.Module:
        """Cut the model copy in place (once) and return it; ``veto(group) -> True`` skips a group."""
        if getattr(self, "_applied", False):
            raise PruningError("this space was already applied; build a new one from the original model")
        for group in self.interactive(allocation):
            if veto is not None and veto(group):
                continue
            group.prune()
        self._applied = True
        return self._finish(self.model, allocation)

    def pruned_copy(self, allocation: Allocation) -> nn.Module:
        """A pruned deep copy of the (unapplied) model; the space, its model and its graph stay untouched.

        Cuts exactly what :meth:`apply` would (same groups, indices, checks and order) on a fresh
        dependency graph of the copy, so ``space.pruned_copy(a)`` has the shapes of ``space.apply(a)``.
        """
        if getattr(self, "_applied", False):
            raise PruningError("cannot copy a space that was already applied; build a new one from the original model")
        model = copy.deepcopy(self.model)
        DG = dependency_graph(model, self.example)
        for module, fn, idxs in self._planned(model, DG, allocation):
            group = DG.get_pruning_group(module, fn, idxs)
            if DG.check_pruning_group(group):
                group.prune()
        return self._finish(model, allocation)

    def _finish(self, model: nn.Module, allocation: Allocation) -> nn.Module:
        """After cutting ``model`` by ``allocation``: attention head counts and attributes, no stale gradients."""
        modules = dict(model.named_modules())
        for i, cut in allocation.items():
            g = self.groups[i]
            if cut.heads and g.attention:
                modules[g.attention].num_heads = g.ch_groups - cut.heads
        update_attention_attributes(model)
        for p in model.parameters():
            p.grad = None
        return model

    def attention_heads(self) -> dict[str, int]:
        """Current ``num_heads`` of every attention module (needed to rebuild head-pruned models)."""
        return {n: int(m.num_heads) for n, m in self.model.named_modules() if hasattr(m, "qkv") and hasattr(m, "num_heads")}

    def pruning_history(self) -> list:
        """Torch-Pruning's record of what was cut (module name, out/in, indices): enough to rebuild the shapes."""
        return [list(h) for h in self.pruner.DG.pruning_history()]

    def group_table(self, allocation: Allocation | None = None) -> list[dict]:
        """One row per group: stage, kind, channels, and what an allocation keeps."""
        allocation = allocation or {}
        rows = []
        for g in self.groups:
            cut = allocation.get(g.index, Cut())
            rows.append(dict(group=g.index, root=g.root, stage=g.stage, kind=g.kind, units=g.channels,
                             replicas=g.ch_groups, kept=g.kept(cut), full=g.full,
                             ratio=round(1 - g.kept(cut) / g.full, 4), scope=g.scope[:60]))
        return rows


def dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` (traced on ``example``), as :class:`PruningSpace` builds it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, ignored_params=[])


def example_input(input_size: int, batch: int = 1, channels: int = 3) -> torch.Tensor:
    """A deterministic dummy batch for tracing and counting."""
    return torch.randn(batch, channels, input_size, input_size, generator=torch.Generator().manual_seed(0))


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[float, int]:
    """MACs per sample and parameters, counted the way Torch-Pruning counts them."""
    macs, params = tp.utils.count_ops_and_params(model, example)
    return macs, int(params)
