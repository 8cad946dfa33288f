"""Master Agent and safety validator on scripted histories (no model needed except the repair test)."""
from __future__ import annotations

import random

import pytest

from agents.history import RevisionRecord, plan_coords, plan_signature
from agents.limits import SafetyLimits
from agents.master import MasterAgent, MasterConfig, select_best
from agents.profiling import ProfileSummary
from agents.safety import SafetyValidator, fallback_plan
from agents.schemas import CNNStrategy, IsomorphicGroupRatios, ViTStrategy
from agents.strategists import HeuristicStrategist, StrategyContext
from agents.zones import compute_danger_zones
from pruning.plan import PruningPlan
from pruning.solver import MacBand

BASE = 1_000_000.0
BAND = MacBand(target_macs=BASE * 0.5, overshoot_pct=5, undershoot_pct=15)


def cnn_profile(**kw) -> ProfileSummary:
    data = dict(
        family="cnn", base_macs=BASE, stages=["layer1", "layer2", "layer3", "layer4"], kinds=["internal", "residual"],
        group_count=11, groups_by_kind={"internal": 8, "residual": 3},
        min_channels_by_kind={"internal": 64, "residual": 128},
        mac_share_by_kind={"internal": 0.46, "residual": 0.32},
        mac_share_by_stage={"layer1": 0.13, "layer2": 0.18, "layer3": 0.18, "layer4": 0.16},
        known_modules=["conv1", "layer1", "layer1.0", "layer1.0.conv1", "layer4.1.conv2", "fc"],
        ignored_layers=["conv1", "fc"],
    )
    data.update(kw)
    return ProfileSummary(**data)


def vit_profile() -> ProfileSummary:
    return ProfileSummary(
        family="vit", base_macs=BASE, stages=["blocks.0", "blocks.1"], kinds=["mlp", "qkv"], group_count=4,
        groups_by_kind={"mlp": 2, "qkv": 2}, min_channels_by_kind={"mlp": 768, "qkv": 64},
        attention_head_dims=[64, 64], mac_share_by_kind={"mlp": 0.29, "qkv": 0.17},
    )


def rec(rev: int, *, err: float | None = 0.0, acc: float | None = 0.8, status: str = "ok", plan: PruningPlan | None = None,
        collapsed: bool = False, move: str | None = None, parent: int | None = None) -> RevisionRecord:
    in_band = status == "ok" and err is not None and -BAND.undershoot_pct <= err <= BAND.overshoot_pct
    macs = None if err is None else BAND.target_macs * (1 + err / 100)
    return RevisionRecord(
        revision=rev, strategist="heuristic", strategist_used="heuristic", status=status,
        plan=plan or PruningPlan(kind_multipliers={"internal": 1.0, "residual": 0.5}, stage_multipliers={"layer1": 0.5}),
        achieved_macs=macs, error_pct=err, in_band=in_band, accuracy_before=acc, collapsed=collapsed,
        move=move, parent_revision=parent,
    )


# ------------------------------------------------------------------------------------------- Master
def test_empty_history_starts_phase_one():
    g = MasterAgent().analyze([], BAND, cnn_profile())
    assert g.continue_search and g.phase == "find_valid" and g.recommended_action == "explore"
    assert g.multiplier_tuning_order[0] == "kind_multipliers.internal"  # largest MAC share first
    dumped = g.model_dump(by_alias=True)
    assert dumped["continue"] is True  # the paper's JSON key


def test_stagnation_and_delta_r():
    hist = [rec(0, err=40.0, status="ok"), rec(1, err=39.9), rec(2, err=39.8)]
    g = MasterAgent().analyze(hist, BAND, cnn_profile())
    assert g.phase == "find_valid"
    assert g.delta_r == pytest.approx(-0.1)
    assert g.stagnating and g.recommended_action == "diversify"
    assert g.mac_error_groups == {"overshoot": [0, 1, 2]}
    # shrinking error is progress, not stagnation
    hist = [rec(0, err=60.0), rec(1, err=30.0), rec(2, err=10.0)]
    g = MasterAgent().analyze(hist, BAND, cnn_profile())
    assert not g.stagnating and g.delta_r == pytest.approx(-20.0)
    # repeated infeasible attempts (no MACs at all) also stagnate
    hist = [rec(i, err=None, acc=None, status="infeasible") for i in range(3)]
    assert MasterAgent().analyze(hist, BAND, cnn_profile()).stagnating


def test_collapse_gives_conservative_guidance_and_danger_zone():
    collapsed_plan = PruningPlan(kind_multipliers={"internal": 1.0, "residual": 1.0})
    hist = [rec(0, acc=0.85), rec(1, acc=0.60, plan=collapsed_plan, collapsed=True, move="kind:residual+", parent=0)]
    m = MasterAgent()
    assert m.is_collapsed(0.60, 0.90) and not m.is_collapsed(0.81, 0.90)
    g = m.analyze(hist, BAND, cnn_profile(), baseline_accuracy=0.90)
    assert g.collapse_detected and g.recommended_action == "conservative_fallback"
    assert g.best_revision == 0
    [zone] = g.danger_zones
    assert zone.revision == 1 and zone.blame == "kind:residual" and "collapse" in zone.reason
    # the validator moves the same configuration out of the zone
    v = SafetyValidator().validate(collapsed_plan, cnn_profile(), hist, guidance=g)
    assert v.status == "clamped"
    assert any("danger zone of revision 1" in r for r in v.reasons)
    coords = plan_coords(v.plan, cnn_profile().stages, cnn_profile().kinds)
    assert not zone.contains(coords, v.plan.importance, v.plan.round_to, v.plan.allocation)
    assert v.plan.kind_multipliers["residual"] < 1.0  # pruning shifted away from the blamed kind
    # a different criterion is a different configuration: not in the zone
    v2 = SafetyValidator().validate(collapsed_plan.model_copy(update={"importance": "l1"}), cnn_profile(), hist, guidance=g)
    assert v2.status == "accepted"


def test_trap_detection_diversifies():
    hist = [rec(0, acc=0.85)] + [rec(i, acc=0.3, collapsed=True) for i in range(1, 4)] + [rec(4, acc=0.84)]
    g = MasterAgent(extra_revisions=30).analyze(hist, BAND, cnn_profile(), baseline_accuracy=0.9)
    assert g.recommended_action == "diversify" and not g.collapse_detected


def test_early_stop_after_three_consistent_in_band_revisions():
    m = MasterAgent(extra_revisions=30)
    hist = [rec(0, err=50, acc=None), rec(1, acc=0.800), rec(2, acc=0.805), rec(3, acc=0.801)]
    g = m.analyze(hist, BAND, cnn_profile())
    assert not g.continue_search and "MAC convergence" in g.stop_reason and g.recommended_action == "stop"
    # large accuracy spread: keep exploring
    hist = [rec(0, acc=0.70), rec(1, acc=0.80), rec(2, acc=0.75)]
    assert m.analyze(hist, BAND, cnn_profile()).continue_search
    # an out-of-band revision inside the window prevents early stop
    hist = [rec(0, acc=0.80), rec(1, err=30, acc=0.80), rec(2, acc=0.80)]
    assert m.analyze(hist, BAND, cnn_profile()).continue_search


def test_two_phase_search_budget():
    m = MasterAgent(extra_revisions=3, early_stop_acc_range=0.0)
    accs = [None, 0.70, 0.75, 0.72, 0.71]
    hist = [rec(0, err=40, acc=None)] + [rec(i, acc=a) for i, a in enumerate(accs[1:], start=1)]
    g = m.analyze(hist[:3], BAND, cnn_profile())
    assert g.phase == "explore" and g.first_valid_revision == 1 and g.remaining_extra == 2 and g.continue_search
    g = m.analyze(hist, BAND, cnn_profile())
    assert not g.continue_search and "two-phase search complete" in g.stop_reason
    assert m.select_best(hist).revision == 2


def test_max_revisions_stop():
    m = MasterAgent(max_revisions=3)
    hist = [rec(i, err=40, acc=None) for i in range(3)]
    g = m.analyze(hist, BAND, cnn_profile())
    assert not g.continue_search and "maximum revisions" in g.stop_reason


def test_select_best():
    hist = [rec(0, err=30, acc=0.99), rec(1, err=-3, acc=0.80), rec(2, err=1, acc=0.80), rec(3, err=2, acc=0.79)]
    assert select_best(hist).revision == 2  # out-of-band 0.99 ignored; tie on accuracy -> smaller |error|
    hist.append(rec(4, err=0.5, acc=0.95, collapsed=True))  # collapsed candidates only if nothing else
    assert select_best(hist).revision == 2
    assert select_best([rec(0, acc=0.2, collapsed=True), rec(1, acc=0.1)]).revision == 1
    none_in_band = [rec(0, err=30, acc=None), rec(1, err=-20, acc=None), rec(2, err=None, acc=None, status="error")]
    best = select_best(none_in_band)
    assert best.revision == 1 and not best.is_candidate  # Algorithm 2 line 48: argmin |M - target|
    assert select_best([]) is None


# ------------------------------------------------------------------------------------------- Safety
def test_validator_accepts_safe_plan_unchanged():
    plan = PruningPlan(kind_multipliers={"internal": 1.0, "residual": 0.5}, stage_multipliers={"layer1": 0.5})
    v = SafetyValidator().validate(plan, cnn_profile())
    assert v.status == "accepted" and v.reasons == [] and v.plan == plan


def test_validator_clamps_cnn_limits():
    plan = PruningPlan(importance="taylor", stage_multipliers={"layer1": 1.8, "layer3": 3.5, "layer9": 1.0},
                       kind_multipliers={"internal": 1.0, "residual": 2.5, "mlp": 2.0}, max_layer_ratio=0.95,
                       round_to=64)
    v = SafetyValidator().validate(plan, cnn_profile())
    assert v.status == "clamped"
    text = " | ".join(v.reasons)
    for needle in ("taylor", "layer9", "layer3 multiplier 3.5 clamped to 2", "first stage layer1", "residual multiplier 2.5",
                   "kind 'mlp'", "max_layer_ratio 0.95", "round_to 64"):
        assert needle in text, needle
    p = v.plan
    assert p.importance == "l2" and p.stage_multipliers == {"layer1": 1.0, "layer3": 2.0}
    assert p.kind_multipliers == {"internal": 1.0, "residual": 2.0} and p.max_layer_ratio == 0.9 and p.round_to == 32
    assert SafetyValidator().violations(p, cnn_profile()) == []


def test_validator_clamps_vit_limits_from_strategy():
    s = ViTStrategy(importance_criterion="l2", round_to=4, isomorphic_group_ratios=IsomorphicGroupRatios(
        mlp_multiplier=0.4, qkv_multiplier=0.95, proj_multiplier=0.3, head_multiplier=0.5))
    v = SafetyValidator().validate(s, vit_profile(), base_plan=PruningPlan(min_head_dim=4))
    assert v.status == "clamped"
    km = v.plan.kind_multipliers
    assert km["qkv"] == pytest.approx(0.4) and km["head"] == 0 and km["proj"] == 0 and km["mlp"] == 0.4
    assert v.plan.round_to == 8 and v.plan.min_head_dim == 8
    text = " | ".join(v.reasons)
    assert "qkv multiplier 0.95" in text and "head multiplier" in text and "proj multiplier" in text


def test_validator_rejects_unusable_strategies_with_fallback_preset():
    prof = cnn_profile()
    zero = PruningPlan(kind_multipliers={"internal": 0.0, "residual": 0.0})
    v = SafetyValidator().validate(zero, prof, band=BAND)
    assert v.status == "rejected" and v.fallback_used and "fallback preset" in v.reasons[-1]
    assert SafetyValidator().violations(v.plan, prof) == []
    # dropping the user's ignored layers is a rejection, unknown names are removed
    base = PruningPlan(ignored_layers=["layer1.0.conv1"])
    v = SafetyValidator().validate(PruningPlan(ignored_layers=[]), prof, base_plan=base)
    assert v.status == "rejected" and "ignored layers" in v.reasons[0] and v.plan.ignored_layers == ["layer1.0.conv1"]
    v = SafetyValidator().validate(PruningPlan(ignored_layers=["layer1.0.conv1", "nope"]), prof, base_plan=base)
    assert v.status == "clamped" and v.plan.ignored_layers == ["layer1.0.conv1"]
    # ViT with only QKV pruning -> QKV clamped to 0 -> nothing left -> preset (MLP over QKV, no heads/proj)
    vit = vit_profile()
    v = SafetyValidator().validate(PruningPlan(kind_multipliers={"mlp": 0.0, "qkv": 1.0}), vit, band=BAND)
    assert v.status == "rejected"
    km = v.plan.kind_multipliers
    assert km["head"] == 0 and km["proj"] == 0 and 0 < km["qkv"] <= km["mlp"] and v.plan.round_to in (8, 16)


def test_fallback_presets_follow_paper_formulas():
    vit = vit_profile()
    p = fallback_plan(vit, BAND)  # target_ratio 0.5, CIFAR-style
    assert p.kind_multipliers["mlp"] == pytest.approx(min(1.4, 0.7 / 0.5))
    assert p.kind_multipliers["qkv"] == pytest.approx(min(1.0, 0.5 / 0.5))
    p = fallback_plan(vit, BAND, dataset="imagenet")
    assert p.kind_multipliers["mlp"] == pytest.approx(min(1.0, 0.4 / 0.5))
    assert p.kind_multipliers["qkv"] <= 0.5 * p.kind_multipliers["mlp"] + 1e-9  # imagenet qkv/mlp limit


def test_no_unsafe_plan_leaves_the_validator():
    rng = random.Random(0)
    validator = SafetyValidator()
    for family, prof in (("cnn", cnn_profile()), ("vit", vit_profile())):
        kinds = ["internal", "residual", "mlp", "qkv", "head", "proj"]
        for _ in range(150):
            plan = PruningPlan(
                importance=rng.choice(["l1", "l2", "taylor", "random"]),
                stage_multipliers={s: round(rng.uniform(0, 6), 2) for s in prof.stages + ["bogus"] if rng.random() < 0.6},
                kind_multipliers={k: round(rng.uniform(0, 6), 2) for k in kinds if rng.random() < 0.6},
                round_to=rng.choice([1, 2, 3, 4, 8, 16, 32, 64]), max_layer_ratio=round(rng.uniform(0.1, 0.99), 2),
                min_head_dim=rng.choice([1, 4, 8, 16]),
            )
            v = validator.validate(plan, prof, band=BAND)
            assert validator.violations(v.plan, prof) == [], (family, plan, v)
            assert (v.status == "accepted") == (not v.reasons)


def test_repair_solution_caps_solved_qkv_ratio():
    """The solver picks the ratio, so QKV <= 85 % is checked (and repaired) after solving."""
    import timm

    from pruning.engine import solved_kind_ratios
    from pruning.solver import solve
    from pruning.space import PruningSpace, example_input

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, depth=2).eval()
    ex = example_input(32)
    plan = PruningPlan(kind_multipliers={"mlp": 1.0, "qkv": 1.0}, round_to=8)
    space = PruningSpace.build(model, ex, plan)
    band = MacBand(target_macs=space.base_macs * 0.3)
    sol = solve(space, plan, band)
    assert solved_kind_ratios(space, sol)["qkv"] > 0.85  # unsafe as solved
    validator = SafetyValidator()
    plan2, sol2, notes = validator.repair_solution(space, plan, band, sol, solve)
    ratios = solved_kind_ratios(space, sol2)
    assert ratios["qkv"] <= 0.85 and max(ratios.values()) <= 0.9 and notes
    assert plan2.kind_multipliers["qkv"] < 1.0 and sol2.in_band


# ------------------------------------------------------------------------------------------- Heuristic
def test_heuristic_learns_from_harmful_moves_and_never_repeats():
    prof = cnn_profile()
    h = HeuristicStrategist()
    ctx0 = StrategyContext(revision=0, profile=prof, band=BAND)
    p0 = h.propose(ctx0)
    assert p0.move == "initial" and p0.plan.kind_multipliers == {"internal": 1.0, "residual": 0.5}
    assert p0.plan.stage_multipliers == {"layer1": 0.5}
    r0 = rec(0, acc=0.80, plan=p0.plan)
    # residual pruned more -> accuracy dropped: shift pruning away from residual channels
    hurt = h.apply_move(p0.plan, "kind:residual+", prof)
    r1 = rec(1, acc=0.70, plan=hurt, move="kind:residual+", parent=0)
    hist = [r0, r1]
    g = MasterAgent().analyze(hist, BAND, prof)
    p2 = h.propose(StrategyContext(revision=2, profile=prof, band=BAND, history=hist, guidance=g))
    assert p2.move == "kind:residual-" and p2.parent_revision == 0
    assert p2.plan.kind_multipliers["residual"] < 0.5
    # keep proposing: never an executed plan again, never the harmful move
    seen = {plan_signature(r.plan, prof.stages, prof.kinds) for r in hist}
    for i in range(2, 14):
        g = MasterAgent(max_revisions=100, extra_revisions=100).analyze(hist, BAND, prof)
        p = h.propose(StrategyContext(revision=i, profile=prof, band=BAND, history=hist, guidance=g))
        sig = plan_signature(p.plan, prof.stages, prof.kinds)
        assert sig not in seen and p.move != "kind:residual+"
        seen.add(sig)
        assert SafetyValidator().validate(p.plan, prof).status == "accepted"  # heuristic stays within limits
        hist.append(rec(i, acc=0.79 - 0.001 * i, plan=p.plan, move=p.move, parent=p.parent_revision))


def test_heuristic_collapse_protects_fragile_parts():
    prof = vit_profile()
    h = HeuristicStrategist()
    p0 = h.propose(StrategyContext(revision=0, profile=prof, band=BAND)).plan
    assert p0.kind_multipliers["qkv"] < p0.kind_multipliers["mlp"] and p0.kind_multipliers["head"] == 0
    hist = [rec(0, acc=0.2, plan=p0, collapsed=True)]
    g = MasterAgent().analyze(hist, BAND, prof, baseline_accuracy=0.9)
    p1 = h.propose(StrategyContext(revision=1, profile=prof, band=BAND, history=hist, guidance=g))
    assert p1.move == "kind:qkv-" and p1.plan.kind_multipliers["qkv"] < p0.kind_multipliers["qkv"]


def test_schema_aliases_and_extra_keys():
    s = CNNStrategy.model_validate({"importance_criterion": "Magnitude", "round_to": "16", "channel_pruning_ratio": 0.4,
                                    "baseline_mac": 1.8, "surprise": [1, 2]})
    assert s.importance_criterion == "l2norm" and s.round_to == 16
    assert s.to_plan(PruningPlan()).importance == "l2"
    assert CNNStrategy.model_validate({"importance_criterion": "l1"}).to_plan(PruningPlan()).importance == "l1"
    with pytest.raises(ValueError):
        CNNStrategy.model_validate({"stage_multipliers": {"layer1": -1}})


def test_danger_zone_helpers():
    prof = cnn_profile()
    hist = [rec(0, status="infeasible", err=None, acc=None), rec(1, acc=0.8)]
    zones = compute_danger_zones(hist, prof)
    assert [z.revision for z in zones] == [0] and zones[0].blame is None
    # scale-free: doubling every multiplier is the same configuration
    p = hist[0].plan
    doubled = p.model_copy(update={"kind_multipliers": {k: 2 * v for k, v in p.kind_multipliers.items()}})
    assert zones[0].contains(plan_coords(doubled, prof.stages, prof.kinds), doubled.importance, doubled.round_to)
    assert MasterAgent(MasterConfig(danger_tolerance=0.1)).analyze(hist, BAND, prof).danger_zones[0].tolerance == 0.1
    assert SafetyLimits.for_dataset("ImageNet-1k").qkv_over_mlp_max == 0.5
