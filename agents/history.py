"""The pruning history H of Algorithm 2: one :class:`RevisionRecord` per revision, JSONL round trip.

Records are self-contained (plan as executed, verdict, MACs, accuracies, timings) so that a search
can be resumed from a persisted history and a table can be built with :func:`history_dataframe`.
They never hold secrets: the LLM API key is not part of any record, and the raw LLM reply is
truncated (and scrubbed of the key, should an endpoint echo it).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import IO, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pruning.plan import GROUP_KINDS, PruningPlan, default_kind_multiplier

RAW_REPLY_LIMIT = 4000
#: error prefix of a record whose solved allocation equals an earlier one (recorded, not fine-tuned)
DUPLICATE_PREFIX = "duplicate:"
#: prefix of the note that names the device a candidate was fine-tuned and evaluated on (:func:`device_note`)
DEVICE_NOTE_PREFIX = "device: "


def device_note(device: str, name: str) -> str:
    """The note a fine-tuning step adds to its result: ``device: cuda:0 (NVIDIA H200)``; a record made from
    that result carries it in ``proposal_notes`` and fills ``device`` / ``device_name`` from it."""
    return f"{DEVICE_NOTE_PREFIX}{device} ({name})"


def parse_device_note(note: str) -> tuple[str, str] | None:
    """``(device, name)`` of a :func:`device_note`, else None."""
    if not note.startswith(DEVICE_NOTE_PREFIX):
        return None
    rest = note[len(DEVICE_NOTE_PREFIX):]
    device, _, name = rest.partition(" (")
    return device.strip(), name[:-1] if name.endswith(")") else name

#: the safety validator's verdict on a plan (:class:`agents.safety.Verdict` carries it with the reasons)
VerdictStatus = Literal["accepted", "clamped", "rejected"]
Status = Literal["ok", "infeasible", "error", "rejected"]


def truncate(text: str | None, limit: int = RAW_REPLY_LIMIT) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 20] + f"... [{len(text) - limit + 20} chars cut]"


class RungResult(BaseModel):
    """One successive-halving rung of a candidate's inline fine-tuning."""

    rung: int = Field(ge=0)
    epochs: float = Field(description="cumulative inline epochs at the end of this rung")
    accuracy: float | None = Field(None, description="validation accuracy (fraction) after this rung")
    checkpoint_key: str | None = None
    checkpoint_sha256: str | None = None
    seconds: float | None = None


class RevisionRecord(BaseModel):
    """Everything about one revision r: (s_r, M_r, A_r^zero, A_r^ft, eps_r) and how it came about."""

    model_config = ConfigDict(extra="ignore")

    revision: int = Field(ge=0)
    candidate: int = Field(0, ge=0, description="candidate index within the revision (K candidates per revision, default K = 1)")
    # -- who proposed it ----------------------------------------------------------------------
    strategist: str = Field(description="strategist asked (e.g. 'llm')")
    strategist_used: str = Field(description="strategist whose proposal was used ('heuristic' after a fallback)")
    raw_reply: str | None = Field(None, description="raw LLM reply(ies), truncated")
    fallback_reason: str | None = None
    strategy: dict | None = Field(None, description="the validated strategy JSON")
    proposal_notes: list[str] = Field(default_factory=list)
    parent_revision: int | None = Field(None, description="revision whose plan this one was derived from (heuristic)")
    move: str | None = Field(None, description="heuristic move applied to the parent's plan")
    guidance_action: str | None = Field(None, description="Master Agent's recommended action for this revision")
    # -- safety ------------------------------------------------------------------------------
    verdict: VerdictStatus = "accepted"
    verdict_reasons: list[str] = Field(default_factory=list)
    proposed_plan: PruningPlan | None = Field(None, description="the strategist's plan before validation")
    signature: str | None = Field(None, description="plan_signature of the validated plan (duplicate detection)")
    # -- pruning result ----------------------------------------------------------------------
    plan: PruningPlan = Field(description="the safe plan as executed (channel_ratio = solver ratio when solved)")
    status: Status = "ok"
    error: str | None = None
    solver_ratio: float | None = None
    allocation_digest: str | None = Field(None, description="identity of the solved allocation (duplicate detection)")
    predicted_macs: float | None = None
    achieved_macs: float | None = Field(None, description="re-counted on the really pruned model")
    params: int | None = None
    error_pct: float | None = Field(None, description="(M_r - M_target) / M_target * 100")
    in_band: bool = False
    kind_ratios: dict[str, float] = Field(default_factory=dict, description="largest pruned fraction per group kind")
    # -- accuracy ----------------------------------------------------------------------------
    accuracy_before: float | None = Field(None, description="zero-shot accuracy (fraction) right after pruning")
    accuracy_after: float | None = Field(None, description="accuracy (fraction) after inline fine-tuning")
    collapsed: bool = Field(False, description="accuracy fell more than the collapse threshold below baseline")
    rungs: list[RungResult] = Field(default_factory=list, description="successive-halving rungs this candidate "
                                    "was fine-tuned in (empty with one rung); accuracy_after = the last one's")
    checkpoint_key: str | None = None
    checkpoint_sha256: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    # -- where it ran ------------------------------------------------------------------------
    device: str | None = Field(None, description="device of the candidate's calibration, fine-tuning and "
                               "evaluation ('cpu', 'cuda:0'); pruning itself runs on the CPU")
    device_name: str | None = Field(None, description="that device's GPU name or CPU model")

    @field_validator("raw_reply")
    @classmethod
    def _short(cls, v):
        return truncate(v)

    @model_validator(mode="after")
    def _device_from_notes(self) -> "RevisionRecord":
        """A record made from a fine-tuning result that named its device (:func:`device_note`) says so."""
        if self.device is None:
            for note in reversed(self.proposal_notes):
                found = parse_device_note(note)
                if found:
                    self.device, self.device_name = found
                    break
        return self

    @property
    def accuracy(self) -> float | None:
        """A_r: fine-tuned accuracy when available, else zero-shot."""
        return self.accuracy_after if self.accuracy_after is not None else self.accuracy_before

    @property
    def rung(self) -> int:
        """Index of the last rung this candidate reached (0 without rungs)."""
        return self.rungs[-1].rung if self.rungs else 0

    def accuracy_at(self, rung: int) -> float | None:
        """Validation accuracy after ``rung`` (the fine-tuned accuracy when the record has no rungs)."""
        if not self.rungs:
            return self.accuracy
        return self.rungs[rung].accuracy if rung < len(self.rungs) else None

    @property
    def is_duplicate(self) -> bool:
        """Rejected because its solved allocation (the pruned model) equals an earlier record's."""
        return self.status == "rejected" and (self.error or "").startswith(DUPLICATE_PREFIX)

    @property
    def is_candidate(self) -> bool:
        """In the candidate set C of Algorithm 2 (within tolerance and safely executed)."""
        return self.status == "ok" and self.in_band

    def to_json_line(self) -> str:
        return self.model_dump_json()


def to_jsonl(records: Iterable[RevisionRecord], dest: str | os.PathLike | IO[str] | None = None) -> str:
    """Serialise records, one JSON object per line; also written to ``dest`` (path or text stream) if given."""
    text = "".join(r.to_json_line() + "\n" for r in records)
    if dest is None:
        return text
    if isinstance(dest, (str, os.PathLike)):
        path = Path(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    else:
        dest.write(text)
    return text


def append_jsonl(record: RevisionRecord, path: str | os.PathLike) -> None:
    """Append one record (an ``on_record`` callback for local runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(record.to_json_line() + "\n")


def from_jsonl(src: str | os.PathLike | IO[str]) -> list[RevisionRecord]:
    """Read records written by :func:`to_jsonl` (a path, a stream, or the JSONL text itself)."""
    if isinstance(src, os.PathLike) or (isinstance(src, str) and "\n" not in src and not src.lstrip().startswith("{")):
        text = Path(src).read_text()
    elif isinstance(src, str):
        text = src
    else:
        text = src.read()
    out = []
    for i, line in enumerate(io.StringIO(text)):
        line = line.strip()
        if not line:
            continue
        try:
            out.append(RevisionRecord.model_validate_json(line))
        except ValueError as exc:
            raise ValueError(f"history line {i + 1} is not a revision record: {str(exc).splitlines()[0]}") from None
    return out


def check_history(records: Sequence[RevisionRecord]) -> list[RevisionRecord]:
    """Records sorted by (revision, candidate); revisions 0..n-1 without gaps, no slot twice (resume precondition)."""
    recs = sorted(records, key=lambda r: (r.revision, r.candidate))
    revs = sorted({r.revision for r in recs})
    if revs != list(range(len(revs))):
        raise ValueError(f"history revisions must be 0..n-1 without gaps, got {revs}")
    slots = [(r.revision, r.candidate) for r in recs]
    if len(set(slots)) != len(slots):
        dup = next(s for s in slots if slots.count(s) > 1)
        raise ValueError(f"history holds revision {dup[0]} candidate {dup[1]} twice")
    return recs


# ------------------------------------------------------------------------------------------------
# Plan coordinates (shared by the Master's danger zones, the validator and duplicate detection)
# ------------------------------------------------------------------------------------------------
def plan_coords(plan: PruningPlan, stages: Sequence[str], kinds: Sequence[str]) -> dict[str, float]:
    """Multipliers of every stage and kind, each family divided by its maximum (scale-free shape).

    The solver rescales the base ratio, so multiplying all stage (or all kind) multipliers by the
    same factor yields the same pruned model; normalising makes equal shapes have equal coordinates.
    """
    st = {f"stage:{s}": float(plan.stage_multipliers.get(s, 1.0)) for s in stages}
    kd = {f"kind:{k}": float(plan.kind_multipliers.get(k, default_kind_multiplier(k))) for k in kinds}
    out: dict[str, float] = {}
    for fam in (st, kd):
        top = max(fam.values(), default=0.0)
        for k, v in fam.items():
            out[k] = round(v / top, 4) if top > 0 else 0.0
    return out


def plan_signature(plan: PruningPlan, stages: Sequence[str], kinds: Sequence[str]) -> str:
    """Identity of a plan's *shape* (everything but ``channel_ratio``): equal signatures prune alike."""
    kinds = [k for k in kinds if k in GROUP_KINDS]
    data = dict(
        importance=plan.importance, allocation=plan.allocation, round_to=plan.round_to,
        max_layer_ratio=round(plan.max_layer_ratio, 4), min_head_dim=plan.min_head_dim,
        ignored=sorted(plan.ignored_layers), coords=plan_coords(plan, stages, kinds),
    )
    return json.dumps(data, sort_keys=True)


def history_dataframe(records: Sequence[RevisionRecord]):
    """One row per record with flattened plan fields; import pandas lazily."""
    import pandas as pd

    rows = []
    for r in records:
        p = r.plan
        row = dict(
            revision=r.revision, candidate=r.candidate, strategist=r.strategist, strategist_used=r.strategist_used,
            fallback=r.fallback_reason is not None, fallback_reason=r.fallback_reason, verdict=r.verdict,
            verdict_reasons="; ".join(r.verdict_reasons), status=r.status, move=r.move, parent=r.parent_revision,
            importance=p.importance, allocation=p.allocation, round_to=p.round_to, max_layer_ratio=p.max_layer_ratio,
            stage_multipliers=json.dumps(p.stage_multipliers, sort_keys=True),
            kind_multipliers=json.dumps(p.kind_multipliers, sort_keys=True),
            solver_ratio=r.solver_ratio, predicted_macs=r.predicted_macs, achieved_macs=r.achieved_macs,
            params=r.params, error_pct=r.error_pct, in_band=r.in_band, accuracy_before=r.accuracy_before,
            accuracy_after=r.accuracy_after, accuracy=r.accuracy, collapsed=r.collapsed,
            checkpoint_key=r.checkpoint_key, rung=r.rung, seconds=round(sum(v for k, v in r.timings.items() if "." not in k), 4),
            device=r.device,
        )
        for k, v in sorted(r.kind_ratios.items()):
            row[f"ratio_{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)
