"""A pruning session: model + tokenizer + masks + calibration/validation/test tokens + statistics.

Everything the agent loop, the baselines, the flow and the benchmark share, in plain Python::

    sess = PruneSession.from_model_path(path)          # any local HF causal LM
    sess = PruneSession.embedded()                     # the tiny Qwen3 default (trained once, cached)
    sess.val_ppl(); sess.test_ppl(); sess.profile; sess.norms; sess.mm (MaskedModel)

Validation text drives the agent's rollbacks; test text is only reported (no selection on it).

Device: ``from_model_path`` / ``embedded`` take a ``device`` and a ``dtype`` (:func:`llm_dtype`: bf16 on a
GPU with native bf16, else fp32). The model is read in that dtype and lives on the device for the whole
session: activation statistics, gradient scores, Wanda scores, the selection and the perplexities are
computed there in batches; the keep-masks and the persisted steps stay on the CPU.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pruning.llm.masks import MaskedModel, weights_fingerprint
from pruning.llm.perplexity import perplexity
from pruning.llm.stats import (
    SensitivityProfile,
    activation_norms,
    build_profile,
    calibration_windows,
    gradient_scores,
    prunable_linears,
)
from pruning.llm.tiny_model import (
    CorpusSplits,
    TinyLMConfig,
    corpus_splits,
    load_causal_lm,
    load_tiny_model,
    split_documents,
    token_stream,
)

__all__ = ["DataConfig", "LLMData", "prepare_data", "PruneSession", "text_file_splits", "llm_dtype", "dtype_name",
           "parse_dtype"]


def llm_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype an LLM is held in on ``device``: bf16 on a GPU with native bf16 (compute capability 8.0+),
    else fp32 (the CPU, and older GPUs, where fp16 activations can overflow and unscaled fp16 gradients
    underflow)."""
    from pruning.device import amp_dtype

    return torch.bfloat16 if amp_dtype(device) == torch.bfloat16 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (float32, bfloat16, float16)."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}: expected one of {', '.join(table)}")
    return table[name]


@dataclass(frozen=True)
class DataConfig:
    """Token budgets (bounded so a step stays cheap): calibration sequences, evaluation tokens, window length."""

    seq_len: int = 128
    calib_sequences: int = 32
    grad_sequences: int = 16
    eval_tokens: int = 16384
    seed: int = 0
    text_file: str | None = None  # own text (documents separated by blank lines) instead of the stdlib docstrings


@dataclass
class LLMData:
    calib: torch.Tensor  # [n, seq_len] from the train split
    val: torch.Tensor  # 1-D stream
    test: torch.Tensor  # 1-D stream
    source: str


def text_file_splits(path: str | os.PathLike[str]) -> CorpusSplits:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file not found: {p}")
    docs = [d.strip() for d in p.read_text(encoding="utf-8", errors="replace").split("\n\n") if d.strip()]
    if len(docs) < 20:
        raise ValueError(f"{p}: need at least 20 blank-line separated documents, found {len(docs)}")
    return split_documents(docs)


def prepare_data(tokenizer, cfg: DataConfig = DataConfig()) -> LLMData:
    splits = text_file_splits(cfg.text_file) if cfg.text_file else corpus_splits()
    train = token_stream(splits.train, tokenizer)
    # +1: a window of seq_len predictions needs seq_len + 1 tokens
    val = token_stream(splits.val, tokenizer, max_tokens=cfg.eval_tokens + 1)
    test = token_stream(splits.test, tokenizer, max_tokens=cfg.eval_tokens + 1)
    calib = calibration_windows(train, cfg.calib_sequences, cfg.seq_len, cfg.seed)
    return LLMData(calib=calib, val=val, test=test,
                   source=cfg.text_file or f"stdlib docstrings ({splits.digest()})")


@dataclass
class PruneSession:
    model: torch.nn.Module
    tokenizer: Any
    data: LLMData
    data_config: DataConfig = field(default_factory=DataConfig)
    model_path: str | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.layers = prunable_linears(self.model)
        self.mm = MaskedModel(self.model, self.layers)
        self.fingerprint = weights_fingerprint(self.model, self.layers)
        self._norms: dict[str, torch.Tensor] | None = None
        self._profile: SensitivityProfile | None = None
        self.stats_seconds = 0.0

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_model_path(cls, path: str | os.PathLike[str], data_config: DataConfig = DataConfig(), *,
                        device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
                        ) -> "PruneSession":
        model, tok = load_causal_lm(path, dtype=dtype, device=device)
        return cls(model, tok, prepare_data(tok, data_config), data_config, str(path))

    @classmethod
    def embedded(cls, tiny: TinyLMConfig = TinyLMConfig(), data_config: DataConfig | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, *, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> "PruneSession":
        model, tok, info = load_tiny_model(tiny, cache_dir, dtype=dtype, device=device)
        dc = data_config or DataConfig(seq_len=tiny.seq_len)
        return cls(model, tok, prepare_data(tok, dc), dc, info["path"], info)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- statistics -----------------------------------------------------------------------------
    def compute_stats(self) -> SensitivityProfile:
        """Activation norms (forward hooks) and gradient scores (one backward) on the calibration windows.

        Computed on the model as it is now (normally the dense original, before any pruning).
        """
        t = time.perf_counter()
        self._norms = activation_norms(self.model, self.data.calib, self.layers,
                                       max_sequences=self.data_config.calib_sequences)
        grads = gradient_scores(self.model, self.data.calib, self.layers,
                                max_sequences=self.data_config.grad_sequences)
        self._profile = build_profile(self.layers, self._norms, grads,
                                      calibration_sequences=int(self.data.calib.shape[0]),
                                      calibration_seq_len=int(self.data.calib.shape[1]))
        self.stats_seconds = time.perf_counter() - t
        return self._profile

    @property
    def norms(self) -> dict[str, torch.Tensor]:
        if self._norms is None:
            self.compute_stats()
        return self._norms

    @property
    def profile(self) -> SensitivityProfile:
        if self._profile is None:
            self.compute_stats()
        return self._profile

    # -- evaluation -----------------------------------------------------------------------------
    def val_ppl(self) -> float:
        return perplexity(self.model, self.data.val, self.data_config.seq_len, self.data_config.eval_tokens)

    def test_ppl(self) -> float:
        return perplexity(self.model, self.data.test, self.data_config.seq_len, self.data_config.eval_tokens)

    def reset(self) -> None:
        """Undo every pruning step (exact), back to the original weights."""
        while self.mm.steps:
            self.mm.rollback()
