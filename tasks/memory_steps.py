"""The search steps in memory, without a store or Prefect (the CLI's ``search`` and tests).

``prune_and_measure(plan)``: :func:`tasks.prune_step.prune_candidate` on the ORIGINAL model (Algorithm 1
line 6; the one prune path: analyse a copy, solve onto the band, safety repair, cut, re-count) ->
optional zero-shot evaluation. ``finetune_and_evaluate(measured)``: optional inline fine-tuning of the
pruned model, evaluation, optional checkpoint.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from agents.profiling import ProfileSummary, build_profile
from agents.safety import SafetyValidator
from agents.search import Evaluated, Measured, RungSchedule, Slot
from pruning.device import on_device
from pruning.plan import PruningPlan
from pruning.solver import MacBand
from tasks.contexts import SpaceCache
from tasks.prune_step import prune_candidate

Evaluator = Callable[[nn.Module], float]  # accuracy as a fraction in [0, 1]
Finetuner = Callable[..., nn.Module]  # finetune(model) or, with rungs, finetune(model, epochs of this rung)
Checkpointer = Callable[[nn.Module, Measured], tuple[str, str]]  # -> (key, sha256)


class MemorySteps:
    """Holds the original model (never modified) and implements the search callbacks."""

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        band: MacBand,
        evaluator: Evaluator | None = None,
        *,
        finetune: Finetuner | None = None,
        calibrated_model: nn.Module | None = None,
        validator: SafetyValidator | None = None,
        checkpoint: Checkpointer | None = None,
        seed: int = 0,
        evaluate_zero_shot: bool = True,
        rungs: RungSchedule | None = None,
    ):
        self.model = model
        self.example = example
        self.band = band
        self.evaluator = evaluator
        self.finetune = finetune
        self.calibrated_model = calibrated_model
        self.validator = validator or SafetyValidator()
        self.checkpoint = checkpoint
        self.seed = seed
        self.spaces = SpaceCache()  # one analysed space per criterion, forked by every candidate
        self.evaluate_zero_shot = evaluate_zero_shot
        self.rungs = rungs  # successive halving: rung k fine-tunes measured.model further (in place)
        self._baseline: float | None = None
        self._base_params: int | None = None
        #: None when there is nothing to do after pruning (then zero-shot accuracy is A_r)
        self.finetune_and_evaluate = self._finetune_and_evaluate if (finetune or checkpoint) else None

    # -- profile / baseline ----------------------------------------------------------------------
    def profile(self, *, model_name: str | None = None, dataset: str | None = None,
                num_classes: int | None = None, plan: PruningPlan | None = None,
                sensitivity: bool = True) -> ProfileSummary:
        """Profiling Agent on the original model (an l2 space: no gradients needed); with a calibrated copy
        (and ``sensitivity``) also the Taylor sensitivity per stage and kind."""
        plan = plan or PruningPlan(importance="l2")
        space = self.spaces.get(self.model, self.example, plan.model_copy(update={"importance": "l2"}), self.seed)
        if self._base_params is None:
            self._base_params = sum(p.numel() for p in self.model.parameters())
        prof = build_profile(space, model_name=model_name, dataset=dataset, num_classes=num_classes,
                             base_params=self._base_params, taylor_available=self.calibrated_model is not None,
                             calibrated=self.calibrated_model if sensitivity else None)
        prof.safe_ranges = self.validator.limits.ranges(prof)
        return prof

    def baseline_accuracy(self) -> float | None:
        if self.evaluator is None:
            return None
        if self._baseline is None:
            self._baseline = float(self.evaluator(self.model))
        return self._baseline

    # -- callbacks -------------------------------------------------------------------------------
    def prune_and_measure(self, plan: PruningPlan, slot: Slot | None = None) -> Measured:
        src = self.model
        if plan.importance == "taylor":
            if self.calibrated_model is None:
                return Measured(plan=plan, status="error", error="taylor importance needs a calibrated model copy")
            src = self.calibrated_model
        measured, pruned, _ = prune_candidate(src, self.example, plan, self.band, seed=self.seed, spaces=self.spaces,
                                              validator=self.validator)
        if pruned is None:
            return measured
        if self.evaluator is not None and self.evaluate_zero_shot:
            t = time.perf_counter()
            measured.accuracy_before = float(self.evaluator(pruned))
            measured.timings["eval"] = time.perf_counter() - t
        measured.model = pruned
        return measured

    def _finetune_and_evaluate(self, measured: Measured) -> Evaluated:
        model = measured.model
        if model is None:
            raise ValueError("measured result carries no pruned model")
        timings: dict[str, float] = {}
        if self.finetune is not None:
            t = time.perf_counter()
            if self.rungs is None:
                model = self.finetune(model)
            else:
                k = measured.rung
                model = self.finetune(model, self.rungs.epochs[k] - self.rungs.start(k))
                measured.model = model  # the next rung continues from these weights
            timings["finetune"] = time.perf_counter() - t
        acc = None
        if self.evaluator is not None and self.finetune is not None:
            t = time.perf_counter()
            acc = float(self.evaluator(model))
            timings["eval"] = time.perf_counter() - t
        key = sha = None
        if self.checkpoint is not None:
            t = time.perf_counter()
            key, sha = self.checkpoint(model, measured)
            timings["checkpoint"] = time.perf_counter() - t
        return Evaluated(accuracy_after=acc, checkpoint_key=key, checkpoint_sha256=sha, timings=timings)


def search_steps(model: nn.Module, example: torch.Tensor, band: MacBand, evaluator: Evaluator | None = None,
                     **kwargs) -> MemorySteps:
    """``bridge.prune_and_measure`` / ``bridge.finetune_and_evaluate`` (None without finetune/checkpoint)."""
    return MemorySteps(model, example, band, evaluator, **kwargs)


def _outputs(model: nn.Module, inputs: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """fp32 logits of ``model`` on ``inputs`` in eval mode, computed on ``device`` (the model moves there for the
    call and back: the pruned and original models stay on the CPU, where they are pruned)."""
    with on_device(model, device) as dev:
        was = model.training
        model.eval()
        try:
            return model(inputs.to(dev)).float()
        finally:
            model.train(was)


@torch.no_grad()
def agreement_evaluator(reference: nn.Module, inputs: torch.Tensor, device: torch.device | str | None = None
                        ) -> Evaluator:
    """Cheap accuracy proxy: fraction of ``inputs`` on which a model's argmax matches ``reference``'s
    (forward passes on ``device``; None = where each model is)."""
    reference.eval()
    ref = _outputs(reference, inputs, device).argmax(dim=1)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        out = _outputs(model, inputs, device).argmax(dim=1)
        return float((out == ref.to(out.device)).float().mean())

    return evaluate


@torch.no_grad()
def logit_similarity_evaluator(reference: nn.Module, inputs: torch.Tensor, device: torch.device | str | None = None
                               ) -> Evaluator:
    """Smoother proxy: mean cosine similarity (clipped at 0) between a model's and ``reference``'s logits."""
    reference.eval()
    ref = _outputs(reference, inputs, device)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        out = _outputs(model, inputs, device)
        return float(torch.nn.functional.cosine_similarity(out, ref.to(out.device), dim=1).clamp(min=0).mean())

    return evaluate
