"""The configs of a run, one pydantic model per flow: :class:`RunConfig` (vision models, MAC budget) and
:class:`LLMRunConfig` (causal LMs, sparsity target). Each is the flow's parameters and the CLI's flags, and
derives the run id that makes re-running the same config resume."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.llm_pruning import LLMPruneConfig
from agents.search import RungSchedule
from pruning.artifacts import runs
from pruning.errors import UserError
from pruning.llm.session import DataConfig
from pruning.llm.tiny_model import TinyLMConfig
from pruning.plan import Criterion
from pruning.redact import redact_url

DEFAULT_MODEL = "default"

#: An endpoint URL stored redacted: credentials in it stay in the environment (see ``LLMConfig.for_endpoint``).
LLMUrl = Annotated[str | None, AfterValidator(redact_url)]


def _device_spec(v) -> str:
    """The ``device`` field's normalised form; only the spelling is checked (the config may run elsewhere)."""
    from pruning.device import check_device_spec

    return check_device_spec(v)  # a DeviceError is a ValueError: pydantic reports it as the field's error


class RunConfig(BaseModel):
    """Everything that defines a run. Secrets (API keys, AWS credentials) never go here: they come from env vars."""

    model_config = ConfigDict(extra="forbid")

    # -- what to prune --------------------------------------------------------------------------
    model: str = Field(DEFAULT_MODEL, description="timm name, or 'default' = the embedded digits ResNet-18 (trained once, cached)")
    checkpoint: str | None = Field(None, description="state dict of the user's trained model (weights_only=True)")
    num_classes: int | None = Field(None, gt=0, description="classifier width; default = the data's class count")
    pretrained: bool = Field(False, description="hub weights (needs internet; off by default)")
    data: str = Field("digits", description="'digits' (embedded) or 'imagefolder:PATH' with train/ and val/")
    input_size: int | None = Field(None, gt=0, description="square input side; default from the data/model config")
    # -- the budget -----------------------------------------------------------------------------
    target_macs: str = Field("50%", description="absolute ('2.06G', '500M') or relative to the model ('50%')")
    overshoot_pct: float = Field(5.0, ge=0, le=100, description="allowed % above target (paper Eq. 1)")
    undershoot_pct: float = Field(15.0, ge=0, lt=100, description="allowed % below target")
    # -- the agents -----------------------------------------------------------------------------
    strategist: Literal["heuristic", "llm"] = Field("heuristic", description="who proposes allocation shapes")
    llm_base_url: LLMUrl = Field(None, description="OpenAI-compatible endpoint (key from OPENAI_API_KEY)")
    llm_model: str | None = Field(None, description="model name at that endpoint")
    llm_fallback: bool = Field(True, description="fall back to the heuristic (recorded) when the LLM fails")
    max_revisions: int = Field(8, ge=1, le=1000, description="R_max of Algorithm 1")
    extra_revisions: int = Field(2, ge=0, le=100, description="phase-2 revisions after the first in-band one (paper: 30)")
    candidates_per_revision: int = Field(1, ge=1, le=64, description="K shapes proposed per revision, fine-tuned in "
                                         "parallel on the task runner (1 = the paper's one candidate per revision)")
    importance: Criterion = Field("taylor", description="channel importance (taylor uses calibration batches)")
    round_to: int = Field(8, ge=1, le=64, description="kept channels are multiples of this")
    calibration_batches: int = Field(4, ge=1, description="batches for Taylor importance (paper: 100 x 64)")
    # -- fine-tuning ----------------------------------------------------------------------------
    inline_epochs: int = Field(2, ge=0, description="inline fine-tuning epochs per in-band candidate (paper: 5)")
    rungs: list[float] = Field([1.0], min_length=1, max_length=8, description="successive-halving rungs of inline "
                               "fine-tuning as increasing fractions of inline_epochs ending at 1 (e.g. 0.34,0.67,1: "
                               "every in-band candidate gets a third, the best part two thirds, the rest the full "
                               "budget); [1] = every candidate gets the full budget")
    rung_keep: float = Field(0.5, gt=0, le=1, description="fraction of the results at a rung (this revision's and the "
                             "earlier ones') whose candidates advance to the next rung")
    inline_lr: float | None = Field(None, gt=0, description="None = paper LR for user models, 0.02 for the digits default")
    max_train_batches: int | None = Field(None, ge=1, description="cap batches per epoch (quick runs)")
    extended_epochs: int = Field(4, ge=0, description="extended fine-tuning epochs of the winner with KD + EMA (0 = skip)")
    extended_lr: float | None = Field(None, gt=0, description="None = 0.02 for the digits default, paper LR otherwise")
    # -- latency --------------------------------------------------------------------------------
    latency: bool = Field(True, description="export the winner to ONNX and benchmark original vs pruned")
    latency_runs: int = Field(10, ge=1, description="timed runs per measurement")
    gpu_benchmark: bool = Field(True, description="torch.compile GPU benchmark when CUDA is available")
    # -- where the work runs (not part of the run's identity: a preempted run resumes on another machine) ------
    device: str = Field("auto", description="calibration, fine-tuning and evaluation: auto (CUDA when available), "
                        "cpu, cuda or cuda:N; pruning itself runs on the CPU")
    # -- where candidates run -------------------------------------------------------------------
    task_runner: str = Field("local", description="'local' (threads in the flow process), 'dask' (a local Dask "
                             "cluster), 'dask://HOST:8786' (an existing Dask cluster), 'ray' or 'ray://HOST:10001'")
    finetune_deployment: str | None = Field(None, description="'FLOW/DEPLOYMENT' of the finetune-candidate flow: each "
                                            "candidate's inline fine-tuning runs as a deployment run on its work pool")
    # -- bookkeeping ----------------------------------------------------------------------------
    store: str = Field("runs", description="local directory or s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL)")
    run_id: str | None = Field(None, description="None = derived from this config, so re-running resumes")
    seed: int = Field(0, description="seeds calibration, fine-tuning and the strategist")
    # -- what the inputs contained (filled in by with_fingerprints() at the start of every run) ----------------
    checkpoint_sha256: str | None = Field(None, description="sha256 of the checkpoint file: a changed checkpoint "
                                          "is a new run, never a stale resume")
    data_fingerprint: str | None = Field(None, description="digest of the ImageFolder's file names and sizes "
                                         "(not mtimes, so a copy on another machine resumes the same run)")

    @field_validator("target_macs", mode="before")
    @classmethod
    def _target_str(cls, v):
        from pruning.units import parse_target

        v = str(v).strip()
        try:
            parse_target(v)  # malformed or out-of-range targets fail when the config is made
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v) -> str:
        return _device_spec(v)

    @field_validator("rungs", mode="before")
    @classmethod
    def _rungs_list(cls, v):
        if isinstance(v, str):  # '0.34,0.67,1' from the CLI or a deployment parameter
            try:
                return [float(x) for x in v.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"rungs must be comma-separated fractions, got '{v}'") from None
        return v

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, v: list[float]) -> list[float]:
        if any(not 0 < f <= 1 for f in v) or any(b <= a for a, b in zip(v, v[1:])) or v[-1] != 1:
            raise ValueError(f"rungs must be increasing fractions in (0, 1] ending at 1, got {v}")
        return v

    @model_validator(mode="after")
    def _rung_epochs(self) -> "RunConfig":
        self.rung_schedule()  # rungs that collapse to equal whole epochs fail when the config is made
        return self

    def rung_schedule(self) -> RungSchedule | None:
        """The successive-halving schedule in epochs; None with one rung (every candidate gets the full budget)."""
        if len(self.rungs) == 1 or self.inline_epochs == 0:
            return None
        return RungSchedule.from_fractions(self.rungs, self.inline_epochs, self.rung_keep)

    @field_validator("task_runner")
    @classmethod
    def _runner(cls, v: str) -> str:
        v = v.strip()
        if v in ("local", "dask", "ray") or (v.startswith(("dask://", "tcp://", "ray://")) and len(v.split("://", 1)[1]) > 0):
            return v
        raise ValueError(f"unknown task runner '{v}': use local, dask, dask://HOST:PORT, ray or ray://HOST:PORT")

    @field_validator("finetune_deployment")
    @classmethod
    def _deployment(cls, v: str | None) -> str | None:
        if v is not None and (v.count("/") != 1 or not all(v.split("/"))):
            raise ValueError(f"finetune deployment must be 'FLOW_NAME/DEPLOYMENT_NAME', got '{v}'")
        return v

    def resolve_target(self, base_macs: float) -> float:
        """Absolute MAC target; '50%' means half of ``base_macs``."""
        from pruning.units import resolve_target

        return resolve_target(self.target_macs, base_macs)

    def identity(self) -> dict:
        """Fields that define the run's results (used for the deterministic run id)."""
        out = self.model_dump(exclude={"store", "run_id", "llm_fallback", "latency_runs", "gpu_benchmark",
                                       "task_runner", "finetune_deployment", "device"})
        if out["candidates_per_revision"] == 1:  # the default keeps the run ids of earlier versions
            out.pop("candidates_per_revision")
        if out["rungs"] == [1.0]:  # one rung (the default): rung_keep changes nothing, run ids unchanged
            out.pop("rungs")
            out.pop("rung_keep")
        for name in ("checkpoint_sha256", "data_fingerprint"):  # None (no checkpoint, digits) keeps them too
            if out[name] is None:
                out.pop(name)
        return out

    def with_fingerprints(self) -> "RunConfig":
        """This config with ``checkpoint_sha256`` and ``data_fingerprint`` computed from the inputs as they are
        now (always recomputed: a value carried over from an earlier run or a deployment's parameters may be
        stale)."""
        from pruning.artifacts import file_sha256
        from pruning.train.data import data_fingerprint

        sha = None
        if self.checkpoint:
            try:
                sha = file_sha256(os.path.expanduser(self.checkpoint))
            except OSError as exc:
                raise UserError(f"cannot read checkpoint {self.checkpoint} ({exc.strerror or type(exc).__name__})"
                                ) from None
        return self.model_copy(update={"checkpoint_sha256": sha, "data_fingerprint": data_fingerprint(self.data)})

    def shareable(self) -> "RunConfig":
        """The same config with a local store as an absolute path, so other processes (workers, served runs)
        write to the same directory."""
        if self.store.startswith("s3://"):
            return self
        return self.model_copy(update={"store": os.path.abspath(os.path.expanduser(self.store))})

    def resolved_run_id(self) -> str:
        """``run_id`` if given, else derived from the fields that define the results (same config = same run)."""
        if self.run_id:
            return self.run_id
        return runs.make_run_id({"model": self.model, "target": self.target_macs.replace("%", "pct"),
                                 "strategist": self.strategist}, self.identity())


class LLMRunConfig(BaseModel):
    """Everything that defines an LLM pruning run (the flow's parameters, the CLI's flags)."""

    model_config = ConfigDict(extra="forbid")

    model_path: str | None = Field(None, description="local HF causal-LM directory; None = embedded tiny Qwen3")
    tiny: dict = Field(default_factory=dict, description="TinyLMConfig overrides for the embedded model")
    target_sparsity: float = Field(0.45, gt=0, lt=0.95)
    rollback_threshold: float = Field(0.10, gt=0)
    max_iterations: int = Field(80, ge=1)
    max_layer_sparsity: float = Field(0.9, gt=0, le=0.99)
    nm: str | None = None
    strategist: Literal["heuristic", "llm"] = "heuristic"
    llm_base_url: LLMUrl = None
    llm_model: str | None = None
    llm_fallback: bool = True
    seq_len: int | None = Field(None, ge=8, description="window length; None = the tiny model's (128)")
    calib_sequences: int = Field(32, ge=1)
    grad_sequences: int = Field(16, ge=1)
    eval_tokens: int = Field(16384, ge=64)
    text_file: str | None = Field(None, description="own text (blank-line separated documents)")
    mcq_file: str | None = Field(None, description="MMLU-style JSONL evaluated before and after pruning")
    mcq_limit: int | None = Field(None, ge=1)
    save_dir: str | None = Field(None, description="save_pretrained the pruned model here at the end")
    device: str = Field("auto", description="auto (CUDA when available), cpu, cuda or cuda:N; on CUDA the model is "
                        "held in bf16 (not part of the run's identity)")
    store: str = "runs"
    run_id: str | None = None
    seed: int = 0

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, v) -> str:
        return _device_spec(v)

    def prune_config(self) -> LLMPruneConfig:
        return LLMPruneConfig(target_sparsity=self.target_sparsity, rollback_threshold=self.rollback_threshold,
                              max_iterations=self.max_iterations, max_layer_sparsity=self.max_layer_sparsity, nm=self.nm)

    def tiny_config(self) -> TinyLMConfig:
        return TinyLMConfig(**self.tiny)

    def data_config(self) -> DataConfig:
        seq = self.seq_len or (self.tiny_config().seq_len if self.model_path is None else 128)
        return DataConfig(seq_len=seq, calib_sequences=self.calib_sequences, grad_sequences=self.grad_sequences,
                          eval_tokens=self.eval_tokens, seed=self.seed, text_file=self.text_file)

    def identity(self) -> dict:
        return self.model_dump(exclude={"store", "run_id", "llm_fallback", "max_iterations", "save_dir",
                                        "mcq_file", "mcq_limit", "device"})

    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        name = Path(self.model_path).name if self.model_path else "tiny-qwen3"
        return runs.make_run_id({"kind": "llm", "model": name, "target": f"s{self.target_sparsity:g}",
                                 "nm": self.nm.replace(":", "of") if self.nm else None,
                                 "strategist": self.strategist}, self.identity())
