"""Pruned-model bundles: everything needed to rebuild and reproduce a pruned model, never a pickled module.

A bundle holds the model spec, the plan, Torch-Pruning's pruning history (which channels were cut),
the state dict and metrics. Loading recreates the architecture, replays the history to get the pruned
shapes, then loads the weights strictly — all with ``weights_only=True``.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.errors import UserError, load_failure
from pruning.models import ModelLoadError, ModelSpec, load_model, load_weights
from pruning.plan import PruningPlan
from pruning.space import dependency_graph, example_input, update_attention_attributes

FORMAT = "agentic-pruner/pruned-model/1"


def make_bundle(model: nn.Module, spec: ModelSpec, plan: PruningPlan | None, pruning_history: list,
                input_size: int, metrics: dict[str, Any] | None = None,
                attention_heads: dict[str, int] | None = None) -> dict:
    """Collect a pruned model and what produced it into a plain, ``weights_only``-loadable dict."""
    return {
        "format": FORMAT,
        "model_spec": spec.model_copy(update={"checkpoint": None, "pretrained": False}).model_dump(mode="json"),
        "plan": plan.model_dump(mode="json") if plan is not None else None,
        "pruning_history": [[str(n), bool(o), [int(i) for i in idx]] for n, o, idx in pruning_history],
        "input_size": int(input_size),
        "attention_heads": {str(k): int(v) for k, v in (attention_heads or {}).items()},
        "metrics": metrics or {},
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def bundle_bytes(bundle: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(bundle, buf)
    return buf.getvalue()


def save_bundle(bundle: dict, path: str | Path) -> Path:
    """Write a bundle atomically to ``path``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file path such as {path / 'model.pt'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_bytes(bundle_bytes(bundle))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_bundle(source: str | Path | bytes) -> dict:
    """Read a bundle from a path or bytes with ``weights_only=True``; a damaged file is one clear error."""
    try:
        data = io.BytesIO(source) if isinstance(source, bytes) else Path(source).open("rb")
        with data:
            bundle = torch.load(data, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"pruned model not found: {source}") from None
    except Exception as exc:
        raise ModelLoadError(f"cannot read pruned model bundle: {load_failure(exc)}") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ModelLoadError("not an agentic-pruner pruned-model bundle")
    return bundle


def rebuild(bundle: dict) -> nn.Module:
    """Recreate the pruned model of ``bundle`` with its weights, in eval mode."""
    spec = ModelSpec(**bundle["model_spec"])
    model = load_model(spec)
    if bundle["pruning_history"]:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            dg = dependency_graph(model, example_input(bundle["input_size"]))
            dg.load_pruning_history(bundle["pruning_history"])
        update_attention_attributes(model, bundle.get("attention_heads"))
    load_weights(model, bundle["state_dict"], source="pruned-model bundle")
    return model.eval()


def load_pruned(source: str | Path | bytes) -> tuple[nn.Module, dict]:
    """Load a pruned model bundle; returns ``(model, bundle)``."""
    bundle = read_bundle(source)
    return rebuild(bundle), bundle
