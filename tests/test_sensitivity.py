"""Per-group sensitivity from the profiling step, used by the heuristic and shown (with move effects) to the LLM."""
import torch

from agents.history import RevisionRecord
from agents.master import MasterAgent, move_effects
from agents.profiling import ProfileSummary
from agents.prompts import user_prompt
from agents.schemas import MasterGuidance
from agents.strategists import HeuristicStrategist, StrategyContext
from pruning.plan import PruningPlan
from pruning.solver import MacBand


def _profile(**sens) -> ProfileSummary:
    return ProfileSummary(family="cnn", base_macs=1e9, stages=["layer1", "layer2", "layer3", "layer4"],
                          kinds=["internal", "residual"], group_count=8, min_channels_by_kind={"internal": 64},
                          mac_share_by_stage={"layer1": 0.1, "layer2": 0.1, "layer3": 0.1, "layer4": 0.1},
                          taylor_available=True, **sens)


def _ctx(profile: ProfileSummary, history=()) -> StrategyContext:
    return StrategyContext(revision=len(history), profile=profile, band=MacBand(target_macs=5e8), history=list(history),
                           base_plan=PruningPlan(importance="taylor"))


def test_build_profile_measures_taylor_sensitivity_per_stage_and_kind():
    from pruning.train import calibrate_copy
    from pruning.train.data import DataConfig, build_data
    from pruning.train.default_model import load_default_model
    from tasks.memory_steps import MemorySteps

    torch.manual_seed(0)
    model, _ = load_default_model()  # trained (an untrained timm ResNet zero-inits each block's last BN)
    data = build_data(DataConfig())
    calibrated = calibrate_copy(model, data.calib, 1)
    bridge = MemorySteps(model, torch.randn(1, 3, 32, 32), MacBand(target_macs=1e7), calibrated_model=calibrated)
    prof = bridge.profile(model_name="resnet18")
    assert set(prof.sensitivity_by_stage) == set(prof.stages)
    assert set(prof.sensitivity_by_kind) == set(prof.kinds)
    assert all(v > 0 for v in prof.sensitivity_by_stage.values())
    assert len(set(prof.sensitivity_by_stage.values())) > 1  # it tells the stages apart
    assert "Accuracy sensitivity" in prof.text()
    assert bridge.profile(model_name="resnet18", sensitivity=False).sensitivity_by_stage == {}


def test_heuristic_prunes_sensitive_stages_less():
    flat = HeuristicStrategist().initial_plan(_ctx(_profile()))
    sens = HeuristicStrategist().initial_plan(_ctx(_profile(
        sensitivity_by_stage={"layer1": 1.0, "layer2": 0.5, "layer3": 2.5, "layer4": 0.8})))
    m = {s: sens.stage_multipliers.get(s, 1.0) / flat.stage_multipliers.get(s, 1.0) for s in ["layer2", "layer3",
                                                                                              "layer4"]}
    assert m["layer3"] < 1 < m["layer2"] and m["layer3"] < m["layer4"]
    # and the first phase-2 moves follow the evidence: spare the most sensitive stage, load the least
    moves = HeuristicStrategist()._coordinate_moves(_profile(
        sensitivity_by_stage={"layer1": 1.0, "layer2": 0.5, "layer3": 2.5, "layer4": 0.8}))
    assert moves[:2] == ["stage:layer3-", "stage:layer2+"]


def _rec(rev, acc, move=None, parent=None):
    return RevisionRecord(revision=rev, strategist="heuristic", strategist_used="heuristic", plan=PruningPlan(),
                          in_band=True, accuracy_after=acc, move=move, parent_revision=parent)


def test_prompt_shows_sensitivity_and_which_moves_cost_accuracy():
    hist = [_rec(0, 0.95, "initial"), _rec(1, 0.90, "kind:residual+", 0), _rec(2, 0.96, "stage:layer1-", 0)]
    eff = move_effects(hist)
    assert round(eff["kind:residual+"], 4) == -0.05 and round(eff["stage:layer1-"], 4) == 0.01
    prof = _profile(sensitivity_by_stage={"layer1": 1.7, "layer2": 0.6, "layer3": 1.0, "layer4": 0.9},
                    sensitivity_by_kind={"internal": 0.8, "residual": 1.4})
    text = user_prompt(prof, MacBand(target_macs=5e8), hist, MasterGuidance(), 3, 0.97)
    assert "Accuracy sensitivity" in text and "layer1 1.70" in text and "residual 1.40" in text
    assert "WHICH MOVES COST ACCURACY" in text
    block = text.split("WHICH MOVES COST ACCURACY")[1]
    assert block.index("kind:residual+ (prune residual MORE): -5.00 points") < block.index("stage:layer1-")
    assert MasterAgent  # the Master's view is the same history


def test_vit_revision_zero_reaches_a_tight_budget():
    """The ViT shape prunes qkv at half the mlp rate at ordinary budgets; at 80 % reduction that shape cannot
    get there (the embedding width is never cut), so revision 0 prunes qkv as hard as the safety limits allow
    and a one-revision run lands in band. Both plans pass the safety validator unchanged."""
    import timm

    from agents.safety import SafetyValidator
    from pruning.engine import prune_to_target
    from pruning.space import count_macs_params, example_input

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=4,
                              num_heads=2, num_classes=10).eval()
    ex = example_input(32)
    base = count_macs_params(model, ex)[0]
    vit = ProfileSummary(family="vit", base_macs=base, stages=["blocks"], kinds=["mlp", "qkv", "proj"], group_count=9,
                         min_channels_by_kind={"mlp": 256, "qkv": 32, "proj": 64}, mac_share_by_stage={"blocks": 0.9})
    validator = SafetyValidator(dataset="digits")
    for fraction, qkv in ((0.5, 0.5), (0.2, 1.0)):
        band = MacBand(target_macs=base * fraction, overshoot_pct=0.5, undershoot_pct=1)
        plan = HeuristicStrategist(limits=validator.limits).initial_plan(StrategyContext(
            revision=0, profile=vit, band=band, history=[], base_plan=PruningPlan(importance="l2")))
        assert plan.kind_multipliers == {"mlp": 1.0, "qkv": qkv, "proj": 0.0, "head": 0.0}
        assert not validator.violations(plan, vit)
        _, res, _ = prune_to_target(model, ex, plan, band, strict=False)
        assert res.in_band, (fraction, res.error_pct)
