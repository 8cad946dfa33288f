"""Torch-Pruning's dependency graph, made usable on any timm architecture.

Three things Torch-Pruning's ``DependencyGraph`` gets wrong on common timm models are fixed here,
through TP's own structures (nodes, dependencies, index mappings), never by rewriting the model:

- ``x.split(c)`` / ``torch.chunk`` whose chunks feed several consumers (CSPNet, Res2Net, MixNet,
  GhostNet): TP assumes one consumer per chunk, in chunk order. :func:`split_chunks` inserts one
  pass-through node per chunk (chunk order read from autograd's ``output_nr``), so TP's split
  handling sees exactly one output per chunk.
- ``torch.cat`` of a tensor whose width TP cannot infer (DPN): TP adds ``None`` to an int; the
  concat is left without index mapping instead (its groups are then checked like any other).
- TP recomputes every index mapping of the whole graph on each ``get_pruning_group`` call; while a
  space is being analysed (nothing is cut) the graph does not change, so it is computed once
  (:func:`analysing`); concat offsets and reshape strides are re-derived cheaply during cuts, and
  groups whose closure explodes through reshape cycles (ResNeSt, ReXNet) fail fast. That turns
  minutes into seconds on DenseNet, ReXNet and ResNeSt.

The fixes are installed only while this package works with a graph (:func:`patched`, re-entrant):
other Torch-Pruning users in the same process (plain-TP baselines) get Torch-Pruning as shipped.

:func:`fork_graph` copies a built graph onto a copy of its model (real or ``meta`` weights) in a
fraction of the time a new trace takes, so analysed spaces can be reused and probed.
"""
from __future__ import annotations

import contextlib
import copy
import math
import threading
from typing import Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.group import Group
from torch_pruning.dependency.node import Node
from torch_pruning.utils import op_counter

_ANALYSING = [0]  # > 0 while a space is analysed: index mappings are computed once per graph
_ORIGINAL = {}


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Torch-Pruning with the fixes of this module, for the duration of the context (re-entrant and
    thread-counted: the originals come back when no thread is inside any more). Code elsewhere in the
    process that uses Torch-Pruning directly (benchmarks' plain-TP baselines) gets plain TP."""
    with _LOCK:
        if _DEPTH[0] == 0:
            _install()
        _DEPTH[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                _uninstall()


@contextlib.contextmanager
def analysing() -> Iterator[None]:
    """:func:`patched`, and a graph's index mappings are computed once (the graph is not cut meanwhile)."""
    with patched():
        _ANALYSING[0] += 1
        try:
            yield
        finally:
            _ANALYSING[0] -= 1


_LOCK = threading.RLock()
_DEPTH = [0]
_TARGETS = [  # (owner, attribute, replacement; None = computed once per node)
    (index_mapping, "update_index_mapping", "_update_index_mapping"),
    (index_mapping, "update_concat_index_mapping", "_update_concat_index_mapping"),
    (index_mapping, "update_reshape_index_mapping", None),
    (index_mapping, "update_expand_index_mapping", None),
    (index_mapping._FlattenIndexMapping, "__call__", "_bounded_flatten"),
    (Group, "add_dep", "_bounded_add_dep"),
    (Group, "has_pruning_op", "_indexed_has_pruning_op"),
]


def _install() -> None:
    for owner, attr, replacement in _TARGETS:
        _ORIGINAL[attr] = getattr(owner, attr)
        setattr(owner, attr, globals()[replacement] if replacement else _once_per_node(attr))


def _uninstall() -> None:
    for owner, attr, _ in _TARGETS:
        setattr(owner, attr, _ORIGINAL[attr])


def _once_per_node(name: str):
    """TP's reshape / expand mapping, computed once per node: its stride (e.g. H*W of a flatten) survives
    channel cuts, and recomputing it re-infers channel counts recursively on every ``get_pruning_group``."""
    flag = f"_ap_{name}"

    def update(graph, node) -> None:
        if node.module.__dict__.get(flag):
            return
        _ORIGINAL[name](graph, node)
        _drop_degenerate_repeats(node)
        node.module.__dict__[flag] = True

    return update


def _drop_degenerate_repeats(node) -> None:
    """TP reads every 5-D ``expand`` as a grouped-query-attention repeat; on other expands (Hiera's mask
    units) it computes a repeat or head size of 0 and every group through it fails with ZeroDivisionError.
    Such a mapping is not a repeat of channels: it is removed (indices pass through unchanged)."""
    deps = list(node.dependencies) + [d for n in node.inputs for d in n.dependencies if d.target == node]
    for dep in deps:
        for i, m in enumerate(dep.index_mapping):
            if isinstance(m, index_mapping._GQAIndexMapping) and (m.repeat < 1 or m.head_dim < 1):
                dep.index_mapping[i] = None


#: indices flatten mappings may produce while one group is computed (TP recomputes the mappings at the
#: start of every ``get_pruning_group``, which resets the budget). More is a reshape cycle TP misreads
#: (ResNeSt's radix reshapes double the indices on every pass): the group fails instead of hanging.
MAX_MAPPED_INDICES = 1 << 15
_MAPPED = [0]


def _bounded_flatten(self, idxs):
    _MAPPED[0] += len(idxs) if self.reverse else len(idxs) * self._stride
    if _MAPPED[0] > MAX_MAPPED_INDICES:
        raise RuntimeError(f"index mapping explodes (over {MAX_MAPPED_INDICES} indices through reshapes)")
    return _ORIGINAL["__call__"](self, idxs)


#: dependencies one group may collect: more means TP is going round a cycle of slices or copies it
#: misreads (ReXNet's channel padding), and the group fails instead of running for minutes
MAX_GROUP_ITEMS = 2000


def _bounded_add_dep(self, dep, idxs) -> None:
    if len(self._group) >= MAX_GROUP_ITEMS:
        raise RuntimeError(f"dependency group explodes (over {MAX_GROUP_ITEMS} coupled layers)")
    _ORIGINAL["add_dep"](self, dep, idxs)
    index = self.__dict__.setdefault("_ap_index", {})
    index.setdefault((id(dep.target), dep.handler), []).append(idxs)


def _indexed_has_pruning_op(self, dep, idxs) -> bool:
    """TP's ``Group.has_pruning_op`` through an index by (target, handler) instead of a scan of the group."""
    index = self.__dict__.get("_ap_index")
    if index is None or len(index) and sum(map(len, index.values())) != len(self._group):
        return any(d.target == dep.target and d.handler == dep.handler and i == idxs for d, i in self._group)
    return any(i == idxs for i in index.get((id(dep.target), dep.handler), ()))


def _update_index_mapping(graph) -> None:
    _MAPPED[0] = 0
    if not getattr(graph, "_ap_chunks_split", False):
        graph._ap_chunks_split = True
        split_chunks(graph)
        map_channel_splits(graph)
    if _ANALYSING[0] and getattr(graph, "_ap_mapped", False):
        return
    _ORIGINAL["update_index_mapping"](graph)
    graph._ap_mapped = True


def _update_concat_index_mapping(graph, cat_node: Node) -> None:
    """TP's concat mapping, decided once per concat (is it a channel concat, which dependency gets which
    input's offsets) and afterwards only re-offset from the current ``concat_sizes``: TP re-infers the
    output width recursively on every call, which is what makes DenseNet slow."""
    op = cat_node.module
    slots = getattr(op, "_ap_slots", None)
    if slots is None:
        op.offsets = None
        try:
            _ORIGINAL["update_concat_index_mapping"](graph, cat_node)
        except TypeError:  # a concat input of unknown width: leave this concat without index mapping
            op.concat_sizes = None
        op._ap_slots = _concat_slots(cat_node) if op.offsets is not None and cat_node.enable_index_mapping else []
        return
    if not slots or op.concat_sizes is None:
        return
    offsets = [0]
    for ch in op.concat_sizes:
        offsets.append(offsets[-1] + ch)
    op.offsets = offsets
    for owner, dep_pos, i, reverse in slots:
        node = cat_node if owner < 0 else cat_node.inputs[owner]
        node.dependencies[dep_pos].index_mapping[1] = index_mapping._ConcatIndexMapping(
            offset=offsets[i: i + 2], reverse=reverse)


def _concat_slots(cat_node: Node) -> list[tuple[int, int, int, bool]]:
    """Which dependency TP gives which input's offsets: ``(owner (-1 = the concat, else input position),
    position in the owner's dependencies, input position, reverse)`` - positions survive :func:`fork_graph`."""
    slots = []
    for reverse in (True, False):
        addressed: set[int] = set()
        for i, in_node in enumerate(cat_node.inputs):
            owner = cat_node if reverse else in_node
            target = in_node if reverse else cat_node
            for pos, dep in enumerate(owner.dependencies):
                if id(dep) not in addressed and dep.target == target:
                    slots.append((-1 if reverse else i, pos, i, reverse))
                    addressed.add(id(dep))
                    break
    return slots


# --------------------------------------------------------------------------------------------
# split with several consumers per chunk
# --------------------------------------------------------------------------------------------
def _chunk_count(grad_fn) -> int | None:
    """Number of chunks of a channel split (dim 1), from the autograd node's saved values."""
    dim = getattr(grad_fn, "_saved_dim", None)
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if dim is None or sizes is None or not (0 <= dim < len(sizes)) or dim != 1:
        return None
    if hasattr(grad_fn, "_saved_split_sizes"):
        return len(grad_fn._saved_split_sizes)
    size = getattr(grad_fn, "_saved_split_size", None)
    if not size:
        return None
    return math.ceil(int(sizes[dim]) / int(size))


def _consumer_chunks(split: Node) -> list[int] | None:
    """Chunk index of every output edge of ``split`` (in ``split.outputs`` order), or None if unknown."""
    chunks: list[int | None] = [None] * len(split.outputs)
    for consumer in {id(c): c for c in split.outputs}.values():
        fn = consumer.grad_fn
        nrs = [nr for f, nr in getattr(fn, "next_functions", ()) if f is split.grad_fn]
        slots = [i for i, c in enumerate(split.outputs) if c is consumer]
        if len(nrs) != len(slots):
            return None
        for i, nr in zip(slots, nrs):
            chunks[i] = nr
    return chunks if all(c is not None for c in chunks) else None


def split_chunks(graph: tp.DependencyGraph) -> int:
    """Give every channel split one pass-through node per chunk, in chunk order; returns how many were rewired."""
    rewired = 0
    for node in list(graph.module2node.values()):
        if node.type != tp.ops.OPTYPE.SPLIT:
            continue
        n = _chunk_count(node.grad_fn)
        chunks = _consumer_chunks(node) if n else None
        if not chunks or max(chunks) >= n:
            continue
        if len(node.outputs) == n and chunks == list(range(n)):
            continue  # already one consumer per chunk, in order
        heads = []
        for k in range(n):
            op = tp.ops._ElementWiseOp(graph._op_id, f"SplitChunk{k}")
            graph._op_id += 1
            head = Node(module=op, grad_fn=None, name=None)
            head.inputs.append(node)
            graph.module2node[op] = head
            heads.append(head)
        for consumer, k in zip(node.outputs, chunks):
            heads[k].outputs.append(consumer)
            pos = next(i for i, x in enumerate(consumer.inputs) if x is node)
            consumer.inputs[pos] = heads[k]
        node.outputs = heads
        rewired += 1
    if rewired:
        for node in graph.module2node.values():
            node.dependencies = []
        graph._build_dependency(graph.module2node)
        shape_infer.init_shape_information(graph)
    return rewired


def _split_dim(grad_fn) -> int | None:
    """The (non-negative) dim of a split's autograd node, or None when unknown."""
    dim, sizes = getattr(grad_fn, "_saved_dim", None), getattr(grad_fn, "_saved_self_sym_sizes", None)
    if dim is None or sizes is None:
        return None
    dim = int(dim)
    if dim >= 1 << 63:  # autograd stores a negative dim as an unsigned 64-bit value
        dim -= 1 << 64
    return dim + len(sizes) if dim < 0 else dim


def map_channel_splits(graph: tp.DependencyGraph) -> int:
    """Re-enable the index mapping of channel splits that TP switched off.

    TP disables the mapping of every split downstream of a 3-D unwrapped parameter (a ViT's position
    embedding), meant for token-dim concatenations; a split of the channel dim (``x.chunk(2, -1)`` of a
    gated MLP on tokens, EVA-02's GluMlp) then passes unmapped indices to the next layer. Returns how many."""
    fixed = 0
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.SPLIT or node.enable_index_mapping:
            continue
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        dim = _split_dim(node.grad_fn)
        if sizes is None or dim is None or getattr(node.module, "offsets", None) is None:
            continue
        if (len(sizes) == 3 and dim == 2) or (len(sizes) in (2, 4) and dim == 1):
            node.enable_index_mapping = True
            fixed += 1
    return fixed


# --------------------------------------------------------------------------------------------
# forking a graph onto a model copy
# --------------------------------------------------------------------------------------------
def copy_model(model: nn.Module, device: str | None = None) -> tuple[nn.Module, dict[int, object]]:
    """Deep copy of ``model`` (weights on ``device`` if given, e.g. ``"meta"``); returns it and the id map old -> new."""
    memo: dict[int, object] = {}
    for m in model.modules():  # caches of tensors computed in a traced forward (LeViT's attention biases)
        for v in vars(m).values():
            for t in (v.values() if isinstance(v, dict) else [v]):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    memo[id(t)] = t.detach().to(device) if device else t.detach().clone()
    if device is not None:
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = torch.empty_like(b, device=device)
    new = copy.deepcopy(model, memo)
    mapping: dict[int, object] = {}
    for (_, a), (_, b) in zip(model.named_modules(remove_duplicate=False), new.named_modules(remove_duplicate=False)):
        mapping[id(a)] = b
    for (_, a), (_, b) in zip(model.named_parameters(remove_duplicate=False), new.named_parameters(remove_duplicate=False)):
        mapping[id(a)] = b
    return new, mapping


def _copy_op(op: nn.Module) -> nn.Module:
    new = copy.copy(op)
    new.__dict__ = {k: (list(v) if isinstance(v, list) else v) for k, v in op.__dict__.items()}
    return new


def fork_graph(graph: tp.DependencyGraph, model: nn.Module, mapping: dict[int, object]) -> tp.DependencyGraph:
    """A copy of ``graph`` whose nodes point at ``model`` (a copy made by :func:`copy_model` with ``mapping``)."""
    def remap(obj):
        return mapping.get(id(obj), obj)

    new = copy.copy(graph)
    node_map: dict[int, Node] = {}
    module2node = {}
    for module, node in graph.module2node.items():
        target = mapping.get(id(module))
        if target is None:
            target = _copy_op(module) if isinstance(module, nn.Module) else module
            mapping[id(module)] = target
        clone = copy.copy(node)
        clone.module = target
        node_map[id(node)] = clone
        module2node[target] = clone
    for node in graph.module2node.values():
        clone = node_map[id(node)]
        clone.inputs = [node_map[id(n)] for n in node.inputs]
        clone.outputs = [node_map[id(n)] for n in node.outputs]
        deps = []
        for dep in node.dependencies:
            d = copy.copy(dep)
            d.source, d.target = node_map[id(dep.source)], node_map[id(dep.target)]
            d.index_mapping = list(dep.index_mapping)
            deps.append(d)
        clone.dependencies = deps
    new.model = model
    new.module2node = module2node
    new._module2name = {remap(m): n for m, n in graph._module2name.items()}
    new._param_to_name = {remap(p): n for p, n in graph._param_to_name.items()}
    new.unwrapped_parameters = [tp._helpers.UnwrappedParameters(remap(u[0]), u[1]) for u in graph.unwrapped_parameters]
    new.IGNORED_LAYERS_IN_TRACING = [remap(m) for m in graph.IGNORED_LAYERS_IN_TRACING]
    new.ignored_params = [remap(p) for p in graph.ignored_params]
    new.CUSTOMIZED_PRUNERS = {remap(k): v for k, v in graph.CUSTOMIZED_PRUNERS.items()}
    new._pruning_history = [list(h) for h in graph._pruning_history]
    return new


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[float, int]:
    """MACs per sample and parameters, counted the way Torch-Pruning counts them."""
    macs, params = tp.utils.count_ops_and_params(model, example)
    return macs, int(params)


@torch.no_grad()
def count_in_place(model: nn.Module, example: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``count_ops_and_params``'s MACs on a disposable model (no deep copy first) and the forward's output.

    The same hooks and arithmetic as Torch-Pruning's counter; the hooks and counters are removed again.
    """
    counted = op_counter.add_flops_counting_methods(model)
    counted.eval()
    counted.start_flops_count(ost=None, verbose=False, ignore_list=[])
    try:
        out = counted(example)
        macs, _, _, _ = counted.compute_average_flops_cost()
    finally:
        counted.stop_flops_count()
        op_counter.CUSTOM_MODULES_MAPPING = {}
    return macs, out


# --------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------
def iter_groups(DG: tp.DependencyGraph, ignored: list, root_types) -> Iterator[tuple[nn.Module, object, str | None]]:
    """Torch-Pruning's ``get_all_groups`` (full-width groups, one per root) that survives bad roots:
    yields ``(root, group or None, error or None)``. Unwrapped parameters a group indexes beyond their
    width are not channel-indexed: they are ignored (TP's ``ignored_params``) and the group recomputed."""
    visited: set[int] = set()
    ignored_ids = {id(m) for m in list(ignored) + list(DG.IGNORED_LAYERS_IN_TRACING)}
    for m in list(DG.module2node):
        if id(m) in ignored_ids or id(m) in visited or not isinstance(m, tuple(root_types)):
            continue
        pruner = DG.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        group, error = None, None
        for _ in range(8):
            try:
                group = DG.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except Exception as exc:  # noqa: BLE001 - TP's index mapping fails on this root
                group, error = None, f"dependency graph fails ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"
                break
            bad = _out_of_range(DG, group)
            if bad is None:
                break
            if not isinstance(bad, nn.Parameter):
                group, error = None, f"Torch-Pruning indexes {bad} beyond its width"
                break
            DG.ignored_params.append(bad)
        prunable = True
        for dep, _ in group or []:
            if DG.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                prunable = prunable and id(dep.target.module) not in ignored_ids
        if prunable:
            yield m, group, error


def _out_of_range(DG: tp.DependencyGraph, group):
    """The first member (module name or the parameter itself) whose indices exceed its width, else None."""
    for dep, idxs in group:
        if not idxs:
            continue
        target = dep.target.module
        if dep.target.type == tp.ops.OPTYPE.PARAMETER:
            n = target.shape[dep.target.pruning_dim] if target.dim() else None
            if n is not None and max(idxs) >= n:
                return target
            continue
        n = DG.get_out_channels(target) if DG.is_out_channel_pruning_fn(dep.handler) else DG.get_in_channels(target)
        if n is not None and (max(idxs) >= n or min(idxs) < 0):
            return DG._module2name.get(target, type(target).__name__)
    return None


def group_modules(DG: tp.DependencyGraph, group, names: dict) -> list[str]:
    out = set()
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Parameter):
            n = DG._param_to_name.get(m)
            if n:
                out.add(n.rsplit(".", 1)[0])
        elif m in names:
            out.add(names[m])
    return sorted(out)


def member_weight(root_idxs, full: int, length: int) -> int | torch.Tensor | str:
    """Units a member loses per root unit (int) or per root index (tensor), from TP's ``root_idxs``."""
    if not root_idxs or any(r is None for r in root_idxs):
        return max(1, round(length / full))
    hist = torch.bincount(torch.as_tensor(root_idxs, dtype=torch.long), minlength=full)
    if len(hist) > full:
        return f"a member maps to root index {len(hist) - 1} beyond the group's {full} channels"
    lo, hi = int(hist.min()), int(hist.max())
    return lo if lo == hi else hist


