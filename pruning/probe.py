"""Trial cuts: find the groups whose cut breaks a model, before any solve.

Torch-Pruning's dependency graph can be wrong on architectures it does not know (custom reshapes
that read a width from a Python attribute, channel-indexed buffers, ops it treats as element-wise).
The space cuts every group a little on a copy with ``meta`` weights (shapes only) and runs the
forward pass: a group whose cut fails in Torch-Pruning, breaks the forward pass or changes the output
shape is frozen (never cut; recorded with the reason) and the rest of the model still prunes. The
forward error names the module it happened in, which points at the groups to freeze; when it does
not, the culprit is found by bisection over the groups. The same trial cut, counted, tells whether
the analytic MAC model is exact on this model.

Imports nothing from :mod:`pruning.space` (the space calls in here with itself).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from pruning.cut import cut_group, shape_attributes, sync_shape_attributes
from pruning.graph import count_in_place, patched
from pruning.groups import Allocation, Cut
from pruning.ties import apply_ties

TRIAL_FRACTION = 0.25  # units cut per group in the trial
MAX_ROUNDS = 64
SLOW_FORWARD_S = 0.25  # a real forward slower than this: try meta tensors for the probes


def failing_module(model: nn.Module, example: torch.Tensor, grad: bool = False
                   ) -> tuple[tuple[str, str] | None, BaseException | None]:
    """Run ``model(example)`` (with autograd if ``grad``, as Torch-Pruning traces); on an exception
    ``((name, class) of the innermost running module, exc)``."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[nn.Module] = []

    def enter(m, args):
        stack.append(m)

    def leave(m, args, out):
        if stack and stack[-1] is m:
            stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with torch.set_grad_enabled(grad):
            model.eval()(example)
        return None, None
    except Exception as exc:  # noqa: BLE001 - whatever the model raises
        inner = next((m for m in reversed(stack) if names.get(m)), None)
        return ((names[inner], type(inner).__name__) if inner is not None else None), exc
    finally:
        for h in handles:
            h.remove()


def trial_allocation(groups) -> Allocation:
    """Cut about a quarter of every group's units (at least one, never all)."""
    out = {}
    for g in groups:
        d = min(g.channels - 1, max(1, int(g.channels * TRIAL_FRACTION)))
        if d > 0:
            out[g.index] = Cut(dims=d)
    return out


def _line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:100]}" if text else type(exc).__name__


def cut_copy(space, allocation: Allocation):
    """Cut a fork of ``space``; returns ``(pruned model, fork, None)`` or ``(None, failed group index, reason)``."""
    fork = space.fork(space.probe_device)
    shapes = shape_attributes(fork.model)
    with patched():
        for index, (module, fn, idxs) in zip(sorted(allocation), fork._planned(allocation)):
            try:
                group = fork.DG.get_pruning_group(module, fn, idxs)
                if not fork.DG.check_pruning_group(group):
                    return None, index, "Torch-Pruning refuses to cut it (a member would lose all its channels)"
                cut_group(group, fork.DG)
            except Exception as exc:  # noqa: BLE001
                return None, index, f"Torch-Pruning cannot cut it ({_line(exc)})"
    sync_shape_attributes(shapes)
    fork._applied = True
    try:
        return fork._finish(fork.model, allocation), fork, None
    except Exception as exc:  # noqa: BLE001 - attention bookkeeping that does not fit the cut
        return None, sorted(allocation)[0], f"attention attributes do not fit the cut ({_line(exc)})"


class _Trial:
    """One model's trial: cut, run, and on failure say which groups to blame."""

    def __init__(self, space, choose_device: bool = True):
        self.space = space
        self.out_shape = self._choose_device() if choose_device else None

    def _choose_device(self) -> tuple | None:
        """Probe on real weights, or on ``meta`` tensors when the real forward is slow and meta works.

        Shape-only ``meta`` forwards win on large models; on small inputs the real forward is faster
        (the meta kernels of some ops are Python decompositions). Returns the output shape."""
        timings, shape = {}, None
        for device in ("cpu", "meta"):
            fork = self.space.fork(device)
            t = time.perf_counter()
            try:
                with torch.no_grad():
                    shape = tuple(fork.model.eval()(fork.example).shape)
            except Exception:  # noqa: BLE001 - this model cannot run on meta tensors
                continue
            timings[device] = time.perf_counter() - t
            if timings[device] < SLOW_FORWARD_S:
                break
        self.space.probe_device = min(timings, key=timings.get) if timings else "cpu"
        return shape

    def run(self, allocation: Allocation) -> tuple[set[int] | None, str, float | None]:
        """``(None, '', macs)`` when the cut works, else ``(groups to blame or None, reason, None)``."""
        self.where = None
        pruned, fork, reason = cut_copy(self.space, allocation)
        if pruned is None:
            return {fork}, reason, None  # fork is the index of the group that failed
        try:
            macs, out = count_in_place(pruned, fork.example)
        except Exception:  # noqa: BLE001 - localised below
            where, exc = failing_module(pruned, fork.example)
            if exc is None:
                return None, "the cut breaks Torch-Pruning's MAC counter", None
            if where is None:
                return None, f"cutting it breaks the forward pass ({_line(exc)})", None
            reason = f"cutting it breaks the forward pass in {where[0]} ({where[1]}: {_line(exc)})"
            self.where = where[0]
            return self._groups_in(where[0]), reason, None
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if self.out_shape is not None and shape != self.out_shape:
            return None, f"the cut changes the output shape to {shape}", None
        return None, "", macs

    def _groups_in(self, module: str) -> set[int] | None:
        """Groups to blame for a failure inside ``module`` (walking up to its parents if none touch it):
        the ones that cut its input (it was handed a width it does not expect) if any, else all touching it."""
        while True:
            prefix = module + "." if module else ""
            touching, feeding = set(), set()
            for g in self.space.groups:
                for (n, is_out, _) in g.members:
                    if n == module or n.startswith(prefix):
                        touching.add(g.index)
                        if not is_out:
                            feeding.add(g.index)
                if any(p == module or p.startswith(prefix) for p in _param_modules(g)):
                    touching.add(g.index)
            if touching or not module:
                return (feeding or touching) or None
            module = module.rsplit(".", 1)[0] if "." in module else ""

    def bisect(self, allocation: Allocation) -> int | None:
        """One group whose cut alone (with the others of its half) fails, by bisection."""
        keys = sorted(allocation)
        while len(keys) > 1:
            half = keys[: len(keys) // 2]
            blame, _, macs = self.run({k: allocation[k] for k in half})
            keys = half if macs is None else keys[len(keys) // 2:]
        return keys[0] if keys else None


def _param_modules(g) -> list[str]:
    return [p.rsplit(".", 1)[0] for p in g.params]


def trial_cut(space) -> tuple[Allocation, float] | None:
    """Freeze the groups of ``space`` whose cut breaks the model; returns the working trial cut and its
    measured MACs (to check the MAC model against), or None if no group is left to cut."""
    trial = _Trial(space)
    for _ in range(MAX_ROUNDS):
        allocation = apply_ties(space.groups, space.ties, trial_allocation(space.groups))
        if not allocation:
            return None
        blame, reason, macs = trial.run(allocation)
        if macs is not None:
            find_ties(trial, allocation)
            return allocation, macs
        if _try_tie(trial, allocation):
            continue
        if not blame:
            one = trial.bisect(allocation)
            blame = {one} if one is not None else set(allocation)
        space.freeze(blame, reason)
    space.freeze({g.index for g in space.groups}, "too many groups break the model when cut")
    return None


def _inner(g) -> bool:
    """An attention group whose members all lie inside its attention module (its head dims)."""
    return g.attention is not None and all(n.startswith(g.attention + ".") for n, _, _ in g.members)


def _skewed(space, allocation: Allocation) -> Allocation:
    """The trial allocation with every untied attention group's head dims cut by a different (even) number
    than in the trial, so its width differs from the stream that feeds the attention."""
    out = dict(allocation)
    for g in space.groups:
        if not _inner(g) or g.root in space.ties or g.index not in allocation:
            continue
        d = allocation[g.index].dims
        d = d - 2 if d > 2 else d + 2
        if 0 < d < g.channels:
            out[g.index] = Cut(dims=d)
    return out


def _leader_of(space, follower, module: str) -> object | None:
    """The group as wide as ``follower`` that feeds a layer inside ``module`` from outside it."""
    prefix = module + "."
    for g in space.groups:
        if g is not follower and g.full == follower.full and any(
                not is_out and n.startswith(prefix) for n, is_out, _ in g.members) and any(
                not n.startswith(prefix) for n, _, _ in g.members):
            return g
    return None


def _try_tie(trial: _Trial, allocation: Allocation) -> bool:
    """The last run of ``trial`` failed inside an attention module: tie its group to the stream feeding
    it (with every other attention group of the same class fed by the same stream) if cutting both to
    the same width gets past that module, or freeze it alone if that stream is never cut (the same
    layer of later stages may still be tied); otherwise leave everything as it was and return False."""
    space, where = trial.space, trial.where
    if where is None:
        return False
    follower = next((g for g in space.groups if _inner(g) and g.root not in space.ties
                     and (where == g.attention or where.startswith(g.attention + "."))), None)
    if follower is None:
        return False
    leader = _leader_of(space, follower, follower.attention)
    if leader is None:  # the stream feeding it is not cut at all (the stem's): freeze this one, not its analogues
        space.freeze({follower.index}, "its attention reads the width of a stream that is never cut", analogous=False)
        return True
    modules = dict(space.model.named_modules())
    kind = type(modules[follower.attention])
    new = {g.root: leader.root for g in space.groups if _inner(g) and g.root not in space.ties
           and type(modules[g.attention]) is kind and _leader_of(space, g, g.attention) is leader}
    space.ties.update(new)
    _, _, macs = trial.run(apply_ties(space.groups, space.ties, allocation))
    if macs is None and trial.where == where:  # tying did not help: not a width tie
        for root in new:
            del space.ties[root]
        return False
    return True


def find_ties(trial: _Trial, allocation: Allocation) -> None:
    """After a trial cut that works: find attention groups that must keep the width of the residual
    stream feeding them (:mod:`pruning.ties`); the trial cut every group by the same fraction, so such a
    pair may have matched by chance. Cuts the attention groups to another width; where that breaks one,
    :func:`_try_tie`. Failures it cannot explain are left to the measured cuts of the solve."""
    space = trial.space
    for _ in range(MAX_ROUNDS):
        skewed = _skewed(space, allocation)
        if skewed == allocation:
            return
        _, _, macs = trial.run(apply_ties(space.groups, space.ties, skewed))
        if macs is not None or not _try_tie(trial, skewed):
            return


def blame_cut(space, allocation: Allocation) -> tuple[set[int] | None, str]:
    """The groups to blame when cutting ``allocation`` breaks the model (found on copies of ``space``)."""
    trial = _Trial(space, choose_device=False)
    blame, reason, macs = trial.run(allocation)
    if macs is not None:
        return None, ""
    if not blame:
        one = trial.bisect(allocation)
        blame = {one} if one is not None else None
    return blame, reason
