"""Everything a run can know before its flow starts, checked before the flow starts.

A mistake found here is one line (a :class:`~pruning.errors.UserError`) and nothing is written
anywhere: not to the store, not to Prefect. What the flow would find later (a model, a checkpoint, a
data folder, a MAC target, a store, a busy run, an unusable LLM endpoint) costs a few seconds here
instead of a failed run with a ``config.json`` left behind.
"""
from __future__ import annotations

import logging
import time

import torch

from pruning.artifacts import RunLease, open_store
from pruning.errors import UserError
from tasks.config import DEFAULT_MODEL, RunConfig

log = logging.getLogger(__name__)


def check_model_and_data(config: RunConfig) -> None:
    """The model builds (and its checkpoint loads into it), the data's layout and class count fit it, and an
    absolute MAC target lies below the model's MACs at the input size the run will use."""
    from pruning.models import ModelSpec, default_input_size, load_model
    from pruning.solver import check_below
    from pruning.space import count_macs_params
    from pruning.train.data import data_num_classes, model_num_classes
    from pruning.units import parse_target

    n_data = data_num_classes(config.data)  # layout: train/ and val/ with the same non-empty class folders
    if config.model == DEFAULT_MODEL:
        if n_data != 10:
            raise UserError(f"the embedded default model classifies the 10 digits, but data {config.data!r} has "
                            f"{n_data} classes: pass --model (and --checkpoint) for your own model")
        return
    spec = ModelSpec(name=config.model, num_classes=config.num_classes, pretrained=config.pretrained,
                     checkpoint=config.checkpoint, input_size=config.input_size)
    torch.manual_seed(config.seed)
    model = load_model(spec)  # unknown name, unreadable or mismatching checkpoint: one line each
    n_model = model_num_classes(model)
    if n_model is not None and n_model != n_data:
        hint = (f"pass --num-classes {n_data}" if not config.checkpoint else
                f"use a checkpoint whose classifier has {n_data} outputs (and --num-classes {n_data})")
        raise UserError(f"data {config.data!r} has {n_data} classes but the model outputs {n_model}: {hint}")
    absolute, _ = parse_target(config.target_macs)
    if absolute is not None:
        size = config.input_size or (32 if config.data == "digits" else default_input_size(model))
        base, _ = count_macs_params(model, torch.randn(1, 3, size, size))
        check_below(absolute, base)


def check_llm(config: RunConfig) -> None:
    """With the LLM strategist and fallback disabled, the endpoint must answer now."""
    if config.strategist != "llm" or config.llm_fallback:
        return
    from agents.llm_client import LLMClient, LLMConfig

    LLMClient(LLMConfig.for_endpoint(config.llm_base_url, config.llm_model), fallback=False).check()


def check_not_busy(config: RunConfig, run_id: str) -> None:
    """A live process already working on this run id stops the second one here."""
    lease = RunLease(open_store(config.store), run_id)
    holder = lease.holder()
    if holder is not None and not lease.is_free(holder, time.time()):
        raise UserError(f"run {run_id} is already running ({holder.describe()}); wait for it to finish, then run "
                        "the same command again to resume it")


def preflight(config: RunConfig) -> RunConfig:
    """Check ``config`` before any work; return it fingerprinted (checkpoint sha256, data digest) with a
    shareable store path, as the flow will see it."""
    from tasks.runners import check_reachable

    config = config.shareable().with_fingerprints()
    check_model_and_data(config)
    check_llm(config)
    if not config.finetune_deployment:
        check_reachable(config.task_runner)  # an unreachable cluster
    open_store(config.store).check()  # unreachable storage / wrong credentials (the last: it makes a local root)
    check_not_busy(config, config.resolved_run_id())
    return config
