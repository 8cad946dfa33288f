"""The pruning space of a model: its prunable groups, their importance, and exact MAC prediction.

``PruningSpace.build`` traces the model once with Torch-Pruning's ``MetaPruner`` (dependency graph,
channel grouping, attention handling, isomorphic scopes) and scores every group once. After that,
turning a plan into per-group cuts (:meth:`PruningSpace.allocate`) and predicting the MACs of those
cuts (:meth:`PruningSpace.predict_macs`) touch no weights: the prediction re-runs Torch-Pruning's own
per-layer counting hooks on shapes, so it equals ``count_ops_and_params`` on the really pruned model.
Only :meth:`PruningSpace.apply` cuts weights, group by group (each can be inspected or vetoed before
it is pruned), and :meth:`PruningSpace.fork` gives a copy of an analysed space to cut instead.

Groups Torch-Pruning cannot index or score, and groups whose trial cut breaks the model
(:mod:`pruning.probe`), are frozen: never cut, listed in :attr:`PruningSpace.frozen` with the reason.
Where a trial cut's count differs from the analytic prediction, ``mac_model.exact`` is False and the
solver measures cut copies instead of predicting.
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

from pruning.cut import (  # noqa: F401 - update_attention_attributes is part of this module's interface
    ReplayGraph,
    alias_heads,
    cut_group,
    shape_attributes,
    sync_shape_attributes,
    unwrapped_parameters,
    update_attention_attributes,
)
from pruning.errors import PruningError
from pruning.graph import (
    analysing,
    copy_model,
    count_in_place,
    count_macs_params,  # noqa: F401 - part of this module's interface
    fork_graph,
    group_modules,
    iter_groups,
    member_weight,
    patched,
)
from pruning.groups import Allocation, Cut, FrozenGroup, GroupInfo, pruned_root_indices
from pruning.importance import create_importance, has_gradients, needs_gradients
from pruning.mac_model import MacModel, attention_modules
from pruning.models import classifier, model_family
from pruning.plan import PruningPlan
from pruning.probe import blame_cut, failing_module, trial_cut
from pruning.ties import Ties, apply_ties, closure


class GroupsFrozen(Exception):
    """A measured cut broke the model and the groups to blame were frozen: solve again."""


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


def stem_and_head(model: nn.Module) -> list[nn.Module]:
    """Layers that are never pruned: the first conv/linear the input meets, and the classifier(s): the
    timm classifier and any other linear/1x1 layer producing ``num_classes`` outputs (a distillation
    head averaged with it, as in EfficientFormer / LeViT)."""
    keep = []
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            keep.append(m)
            break
    head = classifier(model)
    if head is not None:
        keep.append(head)
    classes = getattr(model, "num_classes", None)
    if isinstance(classes, int) and classes > 0:
        for m in model.modules():
            width = m.out_features if isinstance(m, nn.Linear) else getattr(m, "out_channels", None)
            if isinstance(m, (nn.Linear, nn.Conv2d)) and width == classes and all(m is not k for k in keep):
                keep.append(m)
    return keep


# --------------------------------------------------------------------------------------------
# The space
# --------------------------------------------------------------------------------------------
class PruningSpace:
    """Groups, scores and MAC model of one model copy; the copy is what :meth:`apply` prunes.

    Analysing a model (tracing, scoring, the trial cut that finds groups which cannot be cut, the
    MAC model) is the expensive part; :meth:`fork` copies an analysed space onto a copy of its model
    (and dependency graph) so that every revision and candidate of a search cuts its own copy.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, plan: PruningPlan, seed: int = 0,
                 trial: bool = True):
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
        self.user_ignored = sorted({n for n, m in model.named_modules() if m in ignored})
        self.frozen: list[FrozenGroup] = []
        self.inexact: list[str] = []  # groups whose TP closure cuts more than their root says (measured)
        self.probe_device: str = "cpu"  # the trial cut switches to "meta" where that is faster
        self.ties: Ties = {}  # attention groups that keep the width of the stream feeding them (the trial finds them)
        with analysing():
            self.pruner = trace_model(model, example, create_importance(plan.importance, seed), ignored)
            self.DG = self.pruner.DG
            self.groups = self._collect_groups(model)
        self.trialed = trial
        with patched():
            self._finish_analysis(trial)

    def _finish_analysis(self, trial: bool) -> None:
        """Trial cut (freezes groups whose cut breaks the model), stages, MAC model and its check.

        Without the trial (``trial=False``: a one-off solve that will cut this space's own model and can
        rebuild it from the original) nothing is frozen by cutting and ``mac_model.exact`` stays None
        (unchecked: the solver predicts, the caller checks the count)."""
        if not self.groups:
            raise PruningError(f"{type(self.model).__name__} has no prunable channel groups" + self._frozen_note())
        trial = trial_cut(self) if trial else None
        if not self.groups:
            raise PruningError(f"{type(self.model).__name__}: no channel group can be cut without breaking the model"
                               + self._frozen_note())
        self.stages = sorted({g.stage for g in self.groups}, key=natural_key)
        self.mac_model = MacModel(self.model, self.example, self.groups)
        self.base_macs = self.mac_model.base_macs
        if trial is not None:
            allocation, measured = trial
            self.mac_model.exact = self.predict_macs(allocation, strict=False) == measured
        if self.inexact:
            self.mac_model.exact = False

    def refresh(self) -> None:
        """After :meth:`freeze` outside the analysis: stages and MAC model of the remaining groups."""
        if not self.groups:
            raise PruningError(f"{type(self.model).__name__}: no channel group can be cut without breaking the model"
                               + self._frozen_note())
        exact = self.mac_model.exact if getattr(self, "mac_model", None) is not None else None
        self.stages = sorted({g.stage for g in self.groups}, key=natural_key)
        self.mac_model = MacModel(self.model, self.example, self.groups)
        self.mac_model.exact = exact

    def _frozen_note(self) -> str:
        return f" ({len(self.frozen)} frozen, e.g. {self.frozen[0].line()})" if self.frozen else ""

    @property
    def ignored_names(self) -> list[str]:
        """Modules never pruned: the stem, the classifier, the user's, and the members of frozen groups."""
        return sorted(set(self.user_ignored) | {m for f in self.frozen for m in f.modules})

    @classmethod
    def build(cls, model: nn.Module, example: torch.Tensor, plan: PruningPlan, seed: int = 0,
              trial: bool = True) -> "PruningSpace":
        """Analyse a *copy* of ``model`` (the copy will be pruned by :meth:`apply`)."""
        grads = {n: p.grad for n, p in model.named_parameters()}
        clone = copy.deepcopy(model)
        for n, p in clone.named_parameters():  # deepcopy does not copy .grad
            if grads[n] is not None:
                p.grad = grads[n].clone()
        return cls(clone, example, plan, seed, trial=trial)

    def fork(self, device: str | None = None) -> "PruningSpace":
        """The same analysed space on a copy of the model and its dependency graph (weights on ``device``:
        ``"meta"`` for shape-only probes). Groups, scores and the MAC model are shared, read-only."""
        if getattr(self, "_applied", False):
            raise PruningError("cannot copy a space that was already applied; build a new one from the original model")
        model, mapping = copy_model(self.model, None if device == "cpu" else device)
        new = copy.copy(self)
        new.model = model
        new.DG = fork_graph(self.DG, model, mapping)
        new.pruner = None  # analysis only; cutting needs the graph alone
        new.example = self.example if device in (None, "cpu") else self.example.to(device)
        new.frozen = list(self.frozen)
        return new

    # -- analysis ---------------------------------------------------------------------------
    def _collect_groups(self, model: nn.Module) -> list[GroupInfo]:
        """Every prunable group with its scores; groups Torch-Pruning cannot index or score are frozen."""
        pr, DG = self.pruner, self.DG
        names = {m: n for n, m in model.named_modules()}
        stages = _stage_names(model)
        attn_of_qkv = attention_modules(model)
        out: list[GroupInfo] = []
        for root, group, error in iter_groups(DG, pr.ignored_layers, pr.root_module_types):
            if group is not None:
                group, error = _scorable_group(pr, group)
            if error is not None:
                self.frozen.append(FrozenGroup(root=names.get(root, str(root)), reason=error,
                                               modules=group_modules(DG, group, names) if group else [names.get(root, "")]))
                continue
            if group is None:
                continue
            info = self._group_info(group, len(out), names, stages, attn_of_qkv)
            if isinstance(info, str):
                self.frozen.append(FrozenGroup(root=names.get(root, str(root)), reason=info,
                                               modules=group_modules(DG, group, names)))
                continue
            out.append(info)
        return out

    def _group_info(self, group, index: int, names, stages, attn_of_qkv) -> GroupInfo | str:
        """The :class:`GroupInfo` of one TP group (or why it cannot be used)."""
        pr, DG = self.pruner, self.DG
        is_attn, qkv_layers = pr._is_atten_group(group)
        ch_groups = pr._get_channel_groups(group)
        try:
            imp = pr.estimate_importance(group)
        except Exception as exc:  # noqa: BLE001 - TP indexes a member outside its width
            return f"importance cannot be computed ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
        if imp is None:
            return "no importance for this group"
        imp = imp.detach().float().cpu()
        if len(imp) % ch_groups:
            return f"{len(imp)} channels do not split into {ch_groups} channel groups"
        full = len(imp)
        members, weights, params = [], [], []
        for item in group:
            dep, idxs = item
            m = dep.target.module
            if dep.target.type == tp.ops.OPTYPE.PARAMETER:
                params.append(DG._param_to_name.get(m, "?"))
            elif isinstance(m, nn.Module) and m in names:
                w = member_weight(getattr(item, "root_idxs", None), full, len(idxs))
                if isinstance(w, str):
                    return w
                members.append((names[m], DG.is_out_channel_pruning_fn(dep.handler), len(idxs)))
                weights.append(w)
        dim_imp = imp.view(ch_groups, -1).mean(0) if ch_groups > 1 else imp
        head_imp = imp.view(ch_groups, -1).mean(1) if is_attn else None
        scope = "iso"
        for dep, _ in group:
            tag = "out" if DG.is_out_channel_pruning_fn(dep.handler) else "in"
            scope += f"|{type(dep.source.module).__name__}_{tag}>{type(dep.target.module).__name__}_{tag}"
        root = names[group[0].dep.target.module]
        attention = names[attn_of_qkv[qkv_layers[0]]] if is_attn and qkv_layers[0] in attn_of_qkv else None
        info = GroupInfo(
            index=index, root=root, root_is_out=DG.is_out_channel_pruning_fn(group[0].dep.handler),
            kind=self._kind(root, members, is_attn, modules=dict(self.model.named_modules())),
            stage=_stage_of(root, stages), scope=scope, channels=len(dim_imp), ch_groups=ch_groups,
            importance=dim_imp, head_importance=head_imp, members=members, attention=attention,
            member_weights=weights, params=params,
        )
        coupling = self._coupling_error(info, group, names)
        if coupling and coupling.startswith("Torch-Pruning refuses"):
            return coupling
        if coupling:  # cut as TP cuts it, but the MAC model cannot follow: the solver will measure
            self.inexact.append(f"{root}: {coupling}")
        return info

    def _coupling_error(self, g: GroupInfo, group, names) -> str | None:
        """Cut a quarter of the group on the graph (no weights) and check every member loses what the
        weights say: TP closures that wrap around (a slice of a concat of the same channels) cut more
        than planned, and TP then refuses or over-cuts the group at larger ratios."""
        d = min(g.channels - 1, max(1, g.channels // 4))
        if d < 1:
            return None
        idxs = pruned_root_indices(g, Cut(dims=d))
        partial = self.DG.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, idxs)
        if not self.DG.check_pruning_group(partial):
            return f"Torch-Pruning refuses to cut {d} of its {g.channels} channels (a member would lose all)"
        got = {}
        for dep, member_idxs in partial:
            m = dep.target.module
            if isinstance(m, nn.Module) and m in names:
                got[(names[m], self.DG.is_out_channel_pruning_fn(dep.handler))] = len(member_idxs)
        chosen = torch.zeros(g.full, dtype=torch.bool)
        chosen[idxs] = True
        for (name, is_out, _), w in zip(g.members, g.member_weights):
            want = w * len(idxs) if isinstance(w, int) else int(w[chosen].sum())
            if got.get((name, is_out), 0) != want:
                return (f"Torch-Pruning's coupling is inconsistent: cutting {len(idxs)} of its channels cuts "
                        f"{got.get((name, is_out), 0)} of {name}, not {want}")
        return None

    def _kind(self, root: str, members, is_attn: bool, modules) -> str:
        if self.family == "vit":
            if is_attn:
                return "qkv"
            if root.endswith("fc1") or ".mlp." in root + ".":
                return "mlp"
            return "proj"
        convs_out = [n for n, is_out, _ in members if is_out and isinstance(modules.get(n), (nn.Conv2d, nn.Linear))]
        return "residual" if len(convs_out) > 1 else "internal"

    def freeze(self, indices: set[int], reason: str, analogous: bool = True) -> None:
        """Never cut the groups ``indices`` again (reason recorded); the remaining groups are renumbered.

        With ``analogous`` the groups of the same structure (same root path up to block numbers, same
        isomorphic scope: the same layer of the other blocks) are frozen with them: repeated blocks fail
        alike, and finding each one by its own trial cut would cost a cut per block.
        """
        def shape(g: GroupInfo) -> tuple[str, str]:  # block indices masked: stages.1.blocks.2.conv1 -> stages.#.blocks.#.conv1
            return re.sub(r"(?:(?<=\.)|^)\d+(?=\.|$)", "#", g.root), g.scope

        blamed = {shape(g): g.root for g in self.groups if g.index in indices}
        gone = {g.index for g in self.groups if g.index in indices or (analogous and shape(g) in blamed)}
        tied = closure(self.groups, self.ties, gone) - gone  # a tied set is cut together or not at all
        keep = []
        for g in self.groups:
            if g.index in gone or g.index in tied:
                why = (reason if g.index in indices else f"tied to a frozen group: {reason}" if g.index in tied
                       else f"same structure as {blamed[shape(g)]}: {reason}")
                self.frozen.append(FrozenGroup(root=g.root, reason=why, modules=sorted(
                    {n for n, _, _ in g.members} | {p.rsplit(".", 1)[0] for p in g.params})))
            else:
                keep.append(g)
        for i, g in enumerate(keep):
            g.index = i
        self.groups = keep

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
                for g in members:  # a group's channels beyond its cap are not candidates: what a capped group
                    m = plan.multiplier(g.stage, g.kind)  # cannot take goes to the next-lowest scores elsewhere
                    rank = torch.empty(g.channels, dtype=torch.long)
                    rank[torch.argsort(g.importance, stable=True)] = torch.arange(g.channels)
                    eligible = rank < int(g.channels * cap)
                    scores.append((g.importance / m)[eligible])
                    owner.append(torch.full((int(eligible.sum()),), g.index, dtype=torch.long))
                scores_t, owner_t = torch.cat(scores), torch.cat(owner)
                order = torch.argsort(scores_t, stable=True)[:n_total]
                counts = torch.bincount(owner_t[order], minlength=len(self.groups))
                for g in members:
                    dims[g.index] = int(counts[g.index])
        alloc: Allocation = {}
        for g in self.groups:
            d = dims.get(g.index, 0)
            round_to = plan.align(g.channels)
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
        return apply_ties(self.groups, self.ties, alloc, lambda g: plan.align(g.channels), plan.min_head_dim)

    def predict_macs(self, allocation: Allocation, strict: bool = False) -> float:
        """Exact MACs of the model after ``allocation`` without touching weights (see :meth:`MacModel.macs`)."""
        return self.mac_model.macs(allocation, self.groups, strict=strict)

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
        return pruned_root_indices(g, cut)

    def _planned(self, allocation: Allocation) -> list:
        """``(root module, pruning fn, indices)`` per cut group of ``allocation``, on this space's model and graph."""
        modules = dict(self.model.named_modules())
        planned = []
        for i, cut in sorted(allocation.items()):
            g = self.groups[i]
            root = modules[g.root]
            pruner_fn = self.DG.get_pruner_of_module(root)
            fn = pruner_fn.prune_out_channels if g.root_is_out else pruner_fn.prune_in_channels
            planned.append((root, fn, self.pruning_indices(g, cut)))
        return planned

    def interactive(self, allocation: Allocation) -> Iterator:
        """Yield Torch-Pruning groups for ``allocation`` one by one; call ``group.prune()`` to cut (or skip to veto)."""
        with patched():
            for module, fn, idxs in self._planned(allocation):
                group = self.DG.get_pruning_group(module, fn, idxs)
                if self.DG.check_pruning_group(group):
                    yield group

    def apply(self, allocation: Allocation, veto: Callable[[object], bool] | None = None) -> nn.Module:
        """Cut the model copy in place (once) and return it; ``veto(group) -> True`` skips a group.

        Parameters Torch-Pruning does not know of are kept in step: extra per-channel parameters of
        conv/linear subclasses (weight-standardised convs' ``gain``) and tuple attributes that hold a
        parameter's shape (layer scales reshaped with ``self.shape``).
        """
        if getattr(self, "_applied", False):
            raise PruningError("this space was already applied; build a new one from the original model")
        self._applied = True
        shapes = shape_attributes(self.model)
        with patched():
            for group in self.interactive(allocation):
                if veto is not None and veto(group):
                    continue
                cut_group(group, self.DG)
        sync_shape_attributes(shapes)
        return self._finish(self.model, allocation)

    def pruned_copy(self, allocation: Allocation) -> nn.Module:
        """A pruned deep copy of the (unapplied) model; the space, its model and its graph stay untouched.

        Cuts exactly what :meth:`apply` would (same groups, indices, checks and order) on a fork of the
        space (a copy of the model and of its dependency graph), so it has the shapes of ``space.apply(a)``.
        """
        return self.fork().apply(allocation)

    def measure_macs(self, allocation: Allocation) -> float:
        """MACs of the model cut by ``allocation``, counted on a cut copy (``meta`` weights when the model allows)."""
        fork = self.fork(self.probe_device)
        try:
            pruned = fork.apply(allocation)
            return count_in_place(pruned, fork.example)[0]
        except Exception as exc:  # noqa: BLE001 - this allocation breaks the model: freeze the culprits
            blame, reason = blame_cut(self, allocation)
            if not blame:
                raise PruningError(f"cutting {type(self.model).__name__} breaks it ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
            self.freeze(blame, reason)
            self.refresh()
            raise GroupsFrozen(f"froze {len(blame)} groups: {reason}") from None

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
        return [list(h) for h in self.DG.pruning_history()]

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
    """Torch-Pruning's dependency graph of ``model`` (traced on ``example``) as :class:`PruningSpace` builds it
    (same graph fixes, unwrapped parameters and ignored parameters), for replaying a pruning history."""
    with warnings.catch_warnings(), analysing():
        warnings.filterwarnings("ignore")
        DG = ReplayGraph().build_dependency(model, example_inputs=example, ignored_params=[],
                                            unwrapped_parameters=unwrapped_parameters(model))
        for _ in iter_groups(DG, stem_and_head(model), [nn.Conv2d, nn.Linear]):
            pass  # drops unwrapped parameters that are not channel-indexed, as the analysis did
    return DG


def example_input(input_size: int, batch: int = 1, channels: int = 3) -> torch.Tensor:
    """A deterministic dummy batch for tracing and counting."""
    return torch.randn(batch, channels, input_size, input_size, generator=torch.Generator().manual_seed(0))




# --------------------------------------------------------------------------------------------
# Torch-Pruning glue: tracing, groups, parameters TP does not cut
# --------------------------------------------------------------------------------------------
def trace_model(model: nn.Module, example: torch.Tensor, importance, ignored: list[nn.Module]) -> tp.pruner.MetaPruner:
    """Torch-Pruning's MetaPruner on ``model`` (dependency graph, heads, channel groups); one-line error if it fails."""
    alias_heads(model)
    num_heads = {qkv: attn.num_heads for qkv, attn in attention_modules(model).items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            pruner = tp.pruner.MetaPruner(  # no root types while it counts its own channels: we group once, below
                model, example, importance=importance, global_pruning=True, isomorphic=True,
                ignored_layers=ignored, num_heads=num_heads, round_to=None, root_module_types=[],
                unwrapped_parameters=unwrapped_parameters(model),
            )
            pruner.root_module_types = [nn.Conv2d, nn.Linear]
            return pruner
    except Exception as exc:  # noqa: BLE001 - anything TP or the model raises while tracing
        where, _ = failing_module(model, example, grad=True)
        place = f" (in module '{where[0]}' ({where[1]}))" if where else " (in Torch-Pruning's graph construction)"
        raise PruningError(f"cannot trace {type(model).__name__} for structured pruning: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}{place}") from None


def _scorable_group(pr: tp.pruner.MetaPruner, group) -> tuple[object, str | None]:
    """Attention groups re-rooted the way MetaPruner does; ``(None, None)`` for attention groups it skips."""
    is_attn, _ = pr._is_atten_group(group)
    if not is_attn:
        return group, None
    try:
        return pr._downstream_node_as_root_if_attention(group), None
    except Exception as exc:  # noqa: BLE001
        return None, f"attention group cannot be re-rooted ({type(exc).__name__})"
