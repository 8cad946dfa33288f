"""Prompts of the LLM prune agent: the system prompt, the per-iteration user prompt, the re-ask."""
from __future__ import annotations

from agents.llm_pruning.schemas import AgentState

__all__ = ["PRUNE_SYSTEM", "prune_system_prompt", "prune_user_prompt", "prune_reask_prompt"]

PRUNE_SYSTEM = """You are a pruning agent compressing a causal language model without retraining.
Each iteration you choose which linear layers to prune further (unstructured, Wanda: |W| x ||X||, per output
row) and by how much. After the step the validation perplexity is measured; if it rose by more than
{threshold:.0%} relative to the last accepted state, the step is rolled back exactly and you are told.
The goal is to reach overall sparsity {target:.1%} (fraction of zeroed weights over all listed layers) with
the lowest final perplexity.

Sensitivity profile: for each layer, z-scores across layers of the Wanda score (z_wanda) and of the
gradient importance mean |W * dL/dW| (z_grad); z_comb combines them. HIGH z = important: prune it less.
outlier = fraction of weights with Wanda score > 5x the layer mean (outlier-rich layers are fragile).
Use the history (self-reflection): avoid repeating steps that were rolled back; prefer smaller steps on
layers whose steps were costly; take smaller steps near the target.

Rules: layer names must come from the profile; "increase" is the absolute added sparsity of that layer,
0 < increase <= 0.5; a layer's sparsity never exceeds {cap:.2f}; list each layer at most once.{nm_note}

Answer with ONLY one JSON object:
{{"layers": [{{"layer": "<name>", "increase": 0.05}}, ...], "rationale": "<one or two sentences>"}}"""


def prune_system_prompt(state: AgentState) -> str:
    """:data:`PRUNE_SYSTEM` filled in from the loop settings (threshold, target, cap, N:M mode)."""
    nm = state.config.nm
    return PRUNE_SYSTEM.format(
        threshold=state.config.rollback_threshold, target=state.config.target_sparsity,
        cap=state.config.max_layer_sparsity,
        nm_note=f"\nN:M mode {nm}: a chosen layer becomes exactly {nm} sparse (the increase value is ignored)."
        if nm else "")


def prune_reask_prompt(error: str) -> str:
    """The re-ask after an invalid reply (the validation error, then the expected JSON shape)."""
    return (f"Your reply was invalid: {error}\nAnswer again with ONLY the JSON object "
            '{"layers": [{"layer": "<name>", "increase": <number in (0, 0.5]>}, ...], "rationale": "..."}')


def prune_user_prompt(state: AgentState, history_rows: int = 30) -> str:
    cur = state.layer_sparsities
    rows = ["layer | params | z_wanda | z_grad | z_comb | outlier | sparsity"]
    for l in state.profile.layers:
        rows.append(f"{l.name} | {l.params} | {l.z_wanda:+.2f} | {l.z_grad:+.2f} | {l.z_combined:+.2f} | "
                    f"{l.outlier_ratio:.4f} | {cur.get(l.name, 0.0):.3f}")
    hist = ["iter | layers (+increase) | overall before->after | ppl before->after | verdict"]
    for r in state.history[-history_rows:]:
        inc = ", ".join(f"{x.layer}+{x.increase:.3f}" for x in r.requested) or "-"
        ppl_after = "n/a" if r.ppl_after is None else f"{r.ppl_after:.3f}"
        hist.append(f"{r.iteration} | {inc} | {r.sparsity_before:.4f}->{r.sparsity_after:.4f} | "
                    f"{r.ppl_before:.3f}->{ppl_after} | {r.reason}")
    last = state.history[-1] if state.history else None
    feedback = ""
    if last is not None and last.rolled_back:
        feedback = (f"\nLAST STEP WAS ROLLED BACK: {last.reason}. Choose different layers or smaller increases.")
    return (f"Iteration {state.iteration}. Target overall sparsity {state.config.target_sparsity:.4f}; current "
            f"{state.overall_sparsity:.4f} (remaining {state.remaining:.4f} = about "
            f"{int(state.remaining * state.total_params)} weights). Baseline perplexity {state.baseline_ppl:.3f}, "
            f"current {state.current_ppl:.3f}.{feedback}\n\nProfile and current sparsity:\n" + "\n".join(rows)
            + "\n\nHistory of your decisions and their outcomes:\n"
            + ("\n".join(hist) if state.history else "(none yet)") + "\n\nReturn the JSON decision.")
