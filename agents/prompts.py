"""Prompt templates adapted from Appendix A.2 to this engine's shape-plus-solver design."""
from __future__ import annotations

import json
from typing import Sequence

from agents.history import RevisionRecord
from agents.master import move_effects
from agents.profiling import ProfileSummary
from agents.schemas import MasterGuidance
from pruning.plan import PruningPlan
from pruning.solver import MacBand

SOLVER_NOTE = """HOW YOUR OUTPUT IS USED:
- You choose the SHAPE of the pruning: importance criterion, rounding, global vs uniform allocation,
  and multipliers (per kind and per stage). A deterministic MAC solver then scales the base ratio so the
  pruned model lands inside the MAC band, as close to the target as channel granularity allows.
- So every revision is expected to hit the MAC band; use revisions to find the shape with the best accuracy.
- The effective pruning ratio of a group = base_ratio x stage_multiplier x kind_multiplier (capped).
  HIGHER multiplier = that part is pruned MORE relative to the rest; 0 = never prune it.
- channel_pruning_ratio / expected_achieved_mac are only your estimate; the solver decides."""

CNN_SYSTEM = """You are a MAC-budget pruning strategy analyst with STRICT SAFETY ENFORCEMENT.

""" + SOLVER_NOTE + """

KEY PARAMETERS (CNN):
1. importance_criterion: "taylor" (needs calibration gradients; best for ImageNet CNNs), "l1norm"
   (efficient for smaller datasets), "l2norm" (balanced), "random" (baseline only).
2. round_to: hardware granularity of kept channels, one of 1, 2, 4, 8, 16, 32.
3. global_pruning: true ranks channels across structurally equivalent groups; false prunes each group uniformly.
4. kind_multipliers: "internal" (channels inside a block) and "residual" (channels shared by a residual
   stream; pruning them hurts more).
5. stage_multipliers: one per stage name from the profile.

CNN SAFETY LIMITS:
- First conv layer (stem) and final classifier are NEVER pruned (enforced by the engine).
- The first stage is protected: its multiplier must stay <= {first_stage_max}.
- No stage multiplier above {max_stage}; internal/residual multipliers at most {internal_max}/{residual_max}.
- Bottleneck / residual channels: be extra conservative.

Output ONLY one JSON object:
{{
  "importance_criterion": "taylor | l1norm | l2norm | random",
  "channel_pruning_ratio": YOUR_ESTIMATED_BASE_RATIO,
  "round_to": YOUR_CHOSEN_VALUE,
  "global_pruning": true,
  "kind_multipliers": {{"internal": 1.0, "residual": 0.5}},
  "stage_multipliers": {{{stage_example}}},
  "baseline_mac": {baseline_mac},
  "target_mac": {target_mac},
  "expected_achieved_mac": YOUR_ESTIMATE,
  "rationale": "Explain your MAC and accuracy analysis"
}}"""

VIT_SYSTEM = """You are a MAC-budget pruning strategy analyst for Vision Transformers.

""" + SOLVER_NOTE + """

CRITICAL CONSTRAINTS FOR ViT PRUNING:
- Do NOT prune QKV layers aggressively: the effective QKV ratio must stay <= {qkv_max_ratio:.0%}.
- Attention blocks require sufficient head dimension (head_dim >= 8).
- qkv_multiplier must be <= {qkv_over_mlp} x mlp_multiplier; mlp_multiplier <= {mlp_max}, qkv_multiplier <= {qkv_max}.
- proj_multiplier: keep 0.0 (the embedding width is tied to the never-pruned patch embedding).
- head_multiplier: keep 0.0 (do not prune whole attention heads).
- round_to must be 8 or 16 for transformer dims.

ASYMMETRIC RISK STRATEGY:
MLP pruning is typically more robust than QKV pruning. If MAC budget pressure is high, shift allocation
away from QKV and into MLP.

Output ONLY one JSON object:
{{
  "importance_criterion": "taylor | l1norm | l2norm | random",
  "baseline_mac": {baseline_mac},
  "target_macs": {target_mac},
  "round_to": 8,
  "global_pruning": true,
  "isomorphic_group_ratios": {{
    "mlp_multiplier": YOUR_MLP_MULTIPLIER,
    "qkv_multiplier": YOUR_QKV_MULTIPLIER,
    "proj_multiplier": 0.0,
    "head_multiplier": 0.0
  }},
  "rationale": "MAC safety verified with calculations"
}}"""


def system_prompt(profile: ProfileSummary, band: MacBand, limits) -> str:
    km = limits.kind_max
    common = dict(baseline_mac=round(profile.base_macs / 1e9, 6), target_mac=round(band.target_macs / 1e9, 6))
    if profile.family == "vit":
        return VIT_SYSTEM.format(qkv_max_ratio=limits.qkv_max_ratio, qkv_over_mlp=limits.qkv_over_mlp_max,
                                 mlp_max=km.get("mlp", 1.6), qkv_max=km.get("qkv", 1.2), **common)
    example = ", ".join(f'"{s}": {0.5 if i == 0 else 1.0}' for i, s in enumerate(profile.stages[:6]))
    return CNN_SYSTEM.format(first_stage_max=limits.first_stage_max, max_stage=limits.max_stage_multiplier,
                             internal_max=km.get("internal", 2.0), residual_max=km.get("residual", 2.0),
                             stage_example=example, **common)


def _fmt(x, spec=".4g", none="-"):
    return none if x is None else format(x, spec)


def history_table(history: Sequence[RevisionRecord], max_rows: int = 40) -> str:
    """Complete pruning history with MAC errors and accuracies (one line per revision)."""
    if not history:
        return "(no previous revisions)"
    rows = ["rev | by | criterion | round_to | alloc | kind mult | stage mult | solver ratio | GMACs | err % | in band | "
            "acc zero-shot | acc fine-tuned | verdict | note"]
    for r in list(history)[-max_rows:]:
        p = r.plan
        note = r.error or ("COLLAPSE" if r.collapsed else "")
        if r.rungs:
            note = (note + f" fine-tuned {r.rungs[-1].epochs:g} epoch(s) (rung {r.rung})").strip()
        if r.verdict != "accepted" and r.verdict_reasons:
            note = (note + " " + r.verdict_reasons[0])[:120]
        rows.append(" | ".join([
            f"{r.revision}.{r.candidate}" if r.candidate else str(r.revision), r.strategist_used, p.importance, str(p.round_to), p.allocation,
            json.dumps(p.kind_multipliers, sort_keys=True), json.dumps(p.stage_multipliers, sort_keys=True),
            _fmt(r.solver_ratio), _fmt(r.achieved_macs / 1e9 if r.achieved_macs else None),
            _fmt(r.error_pct, "+.2f"), "yes" if r.in_band else "no", _fmt(r.accuracy_before), _fmt(r.accuracy_after),
            r.verdict if r.status == "ok" else r.status, note.strip(),
        ]))
    if len(history) > max_rows:
        rows.insert(1, f"... {len(history) - max_rows} earlier revisions omitted ...")
    return "\n".join(rows)


def move_effects_text(history: Sequence[RevisionRecord]) -> str:
    """One line per move tried so far, worst first: ``kind:residual+ (prune residual MORE): -2.30 points``."""
    eff = move_effects(history)
    lines = []
    for move, d in sorted(eff.items(), key=lambda kv: (kv[1], kv[0])):
        what = ""
        if move[-1:] in "+-" and move.startswith(("stage:", "kind:")):
            what = f" (prune {move[:-1].split(':', 1)[1]} {'MORE' if move[-1] == '+' else 'LESS'})"
        cost = "collapsed or left the band" if d == float("-inf") else f"{100 * d:+.2f} points"
        lines.append(f"- {move}{what}: {cost}")
    return "\n".join(lines)


def guidance_text(g: MasterGuidance) -> str:
    lines = [f"phase: {g.phase}; recommended action: {g.recommended_action}"]
    if g.best_revision is not None:
        lines.append(f"best revision so far: {g.best_revision}")
    if g.multiplier_tuning_order:
        lines.append("multiplier tuning order: " + ", ".join(g.multiplier_tuning_order))
    if g.collapse_detected:
        lines.append("ACCURACY COLLAPSE in the last revision: use a more conservative shape.")
    if g.stagnating:
        lines.append("MAC error is stagnating: change the shape, do not repeat small adjustments.")
    for z in g.danger_zones:
        lines.append(f"danger zone (±{z.tolerance}) around revision {z.revision}: {z.reason}; "
                     f"criterion {z.importance}, round_to {z.round_to}, normalised multipliers {json.dumps(z.coords)}")
    lines.extend(g.notes)
    return "\n".join(lines)


def user_prompt(profile: ProfileSummary, band: MacBand, history: Sequence[RevisionRecord], guidance: MasterGuidance,
                revision: int, baseline_accuracy: float | None, max_rows: int = 40,
                pending: Sequence[PruningPlan] = ()) -> str:
    parts = [
        f"Revision {revision}.",
        "MODEL PROFILE:\n" + profile.text(band),
        f"BASELINE ACCURACY: {baseline_accuracy:.4f}" if baseline_accuracy is not None else "BASELINE ACCURACY: unknown",
        "PRUNING HISTORY (every plan below was executed; do not repeat one):\n" + history_table(history, max_rows),
        "MASTER AGENT GUIDANCE:\n" + guidance_text(guidance),
    ]
    effects = move_effects_text(history)
    if effects:
        parts.insert(4, "WHICH MOVES COST ACCURACY (change vs the parent revision at equal fine-tuning; avoid the "
                     "harmful ones, consider their opposites):\n" + effects)
    if pending:
        parts.append(f"ALREADY PROPOSED FOR REVISION {revision} (evaluated in parallel; propose a clearly different "
                     "allocation shape):\n" + "\n".join(
                         f"- criterion {p.importance}, round_to {p.round_to}, alloc {p.allocation}, kind mult "
                         f"{json.dumps(p.kind_multipliers, sort_keys=True)}, stage mult "
                         f"{json.dumps(p.stage_multipliers, sort_keys=True)}" for p in pending))
    parts.append("Propose the next strategy. Reply with ONLY the JSON object.")
    return "\n\n".join(parts)


def reask_prompt(error: str) -> str:
    return (f"Your previous reply could not be used: {error}\n"
            "Reply again with ONLY one corrected JSON object that follows the schema above (no prose).")
