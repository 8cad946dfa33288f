"""Architectures plain Torch-Pruning cannot prune (or that our solver used to miss), small inputs.

Each was a failure of issue 17: concatenations (DenseNet), splits with several consumers per chunk
(CSPNet), split sizes kept in a Python attribute (MixNet), layer scales reshaped with a stored shape
(PoolFormer), weight-standardised convs with a per-channel gain (NF-ResNet), a loader keyword the model
does not take (FastViT). Random weights: MACs do not depend on weight values.
"""
import pytest
import torch
from torch import nn

from pruning.checkpoint import bundle_bytes, load_pruned, make_bundle
from pruning.engine import OutOfBand, prune_to_target
from pruning.models import ModelSpec, load_model
from pruning.plan import PruningPlan
from pruning.profile import profile_model
from pruning.solver import MacBand, solve
from pruning.space import PruningError, PruningSpace, count_macs_params, example_input
from tasks.contexts import SpaceCache
from tasks.prune_step import prune_candidate

CASES = [  # (name, input size)
    ("densenet121", 64),
    ("cspresnet50", 64),
    ("tf_mixnet_s", 64),
    ("poolformer_s12", 64),
    ("nf_resnet50", 64),
    ("fastvit_t8", 64),
]


def _load(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return load_model(ModelSpec(name=name, num_classes=10, input_size=size)), example_input(size)


def _band(model, example, fraction=0.5) -> MacBand:
    base = count_macs_params(model, example)[0]
    return MacBand(target_macs=base * fraction, overshoot_pct=1, undershoot_pct=5)


@pytest.mark.parametrize("name,size", CASES, ids=[c[0] for c in CASES])
def test_lands_in_band_with_a_working_forward(name, size):
    model, ex = _load(name, size)
    band = _band(model, ex)
    pruned, res, _ = prune_to_target(model, ex, PruningPlan(), band)
    assert res.in_band and abs(res.error_pct) <= 1.0
    assert count_macs_params(pruned, ex)[0] == res.achieved_macs
    with torch.no_grad():
        assert pruned(ex).shape == (1, 10)


def test_loader_passes_only_accepted_keywords():
    fastvit = load_model(ModelSpec(name="fastvit_t8", input_size=64))  # FastVit takes no img_size
    assert fastvit(example_input(64)).shape[-1] == 1000
    vit = load_model(ModelSpec(name="deit_tiny_patch16_224", num_classes=10, input_size=64))
    assert tuple(vit.patch_embed.img_size) == (64, 64)  # ViTs still get their resolution


def test_concat_prediction_is_exact_and_split_space_freezes_only_what_breaks():
    model, ex = _load("densenet121", 64)
    space = PruningSpace.build(model, ex, PruningPlan())
    assert space.mac_model.exact and not space.frozen
    alloc = space.allocate(PruningPlan(), 0.4)
    assert count_macs_params(space.fork().apply(alloc), ex)[0] == space.predict_macs(alloc)

    mix, mex = _load("tf_mixnet_s", 64)
    mspace = PruningSpace.build(mix, mex, PruningPlan())
    assert mspace.frozen and mspace.groups  # some groups frozen, the rest prunes
    prof = profile_model(mix, mex, name="tf_mixnet_s", space=mspace)
    assert len(prof.frozen) == len(mspace.frozen) and "frozen groups" in prof.summary()
    assert {m for f in mspace.frozen for m in f.modules} <= set(mspace.ignored_names)


def test_rebuilt_bundle_has_the_pruned_shapes():
    model, ex = _load("tf_mixnet_s", 64)  # split sizes kept in MixedConv2d.splits must follow the cut
    pruned, res, space = prune_to_target(model, ex, PruningPlan(), _band(model, ex))
    bundle = make_bundle(pruned, ModelSpec(name="tf_mixnet_s", num_classes=10), res.plan, space.pruning_history(), 64,
                         metrics={}, attention_heads=space.attention_heads())
    rebuilt, _ = load_pruned(bundle_bytes(bundle))
    with torch.no_grad():
        assert torch.allclose(rebuilt(ex), pruned.eval()(ex), atol=1e-5)


def test_measured_fallback_lands_where_the_prediction_is_distrusted():
    model, ex = _load("resnet18", 64)
    space = PruningSpace.build(model, ex, PruningPlan())
    space.mac_model.exact = False  # as if the trial cut had disagreed with the prediction
    band = _band(model, ex)
    sol = solve(space, PruningPlan(), band)
    assert sol.source == "measured" and sol.measured_probes >= 1
    assert band.contains(count_macs_params(space.fork().apply(sol.cuts()), ex)[0])


def test_failed_solve_is_one_line_error():
    model, ex = _load("resnet18", 64)
    base = count_macs_params(model, ex)[0]
    band = MacBand(target_macs=base * 0.5, overshoot_pct=0, undershoot_pct=0)  # no width lands exactly
    with pytest.raises(OutOfBand, match=r"from the target .*: ") as err:
        prune_to_target(model, ex, PruningPlan(round_to=32), band)
    assert "\n" not in str(err.value)
    _, res, _ = prune_to_target(model, ex, PruningPlan(round_to=32), band, strict=False)  # the search's mode
    assert not res.in_band


class _NoAutograd(nn.Module):
    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("this block cannot be traced")
        return x


def test_untraceable_model_names_the_module():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), _NoAutograd(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.LazyLinear(4))
    ex = example_input(16)
    with torch.no_grad():
        model(ex)
    with pytest.raises(PruningError, match=r"cannot trace .*\(in module '2' \(_NoAutograd\)\)"):
        PruningSpace.build(model, ex, PruningPlan())


def test_candidates_share_one_analysed_space():
    model, ex = _load("resnet18", 64)
    cache, band = SpaceCache(), _band(model, ex)
    shapes = []
    for mult in (1.0, 0.5):
        m, pruned, space = prune_candidate(model, ex, PruningPlan(stage_multipliers={"layer4": mult}), band,
                                           spaces=cache)
        assert m.status == "ok" and m.in_band and pruned is not None and space.pruning_history()
        shapes.append([p.shape for p in pruned.parameters()])
    assert cache.builds == 1 and cache.hits == 1 and shapes[0] != shapes[1]


def test_gated_mlp_after_a_position_embedding_is_pruned_in_pairs():
    """EVA-02's GluMlp: ``fc1(x).chunk(2, -1)`` on tokens. Torch-Pruning switches the split's index
    mapping off below any 3-D parameter (the position embedding), so fc2 got fc1's indices and every
    group froze; the channel split is mapped again and halves are cut in pairs."""
    import timm
    from timm.layers import GluMlp

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10,
                              mlp_layer=GluMlp).eval()
    ex = example_input(32)
    space = PruningSpace.build(model, ex, PruningPlan())
    assert not space.frozen and any(g.root.endswith("mlp.fc1") for g in space.groups)
    pruned, res, _ = prune_to_target(model, ex, PruningPlan(), _band(model, ex))
    assert res.in_band
    mlp = pruned.blocks[0].mlp
    assert mlp.fc1.out_features == 2 * mlp.fc2.in_features < 2 * model.blocks[0].mlp.fc2.in_features
    with torch.no_grad():
        assert pruned(ex).shape == (1, 10)


def test_anti_aliased_downsampling_is_pruned_and_rebuilds(tmp_path):
    """timm's BlurPool2d (ResNet-blur, TResNet) keeps a filter per channel and its width in a Python
    attribute: every group feeding one froze ("Invalid channel dimensions"). Its filter is one kernel
    repeated, so it follows the new width; the saved bundle rebuilds the same model."""
    model, ex = _load("resnetblur18", 64)
    space = PruningSpace.build(model, ex, PruningPlan())
    assert not space.frozen
    pruned, res, space = prune_to_target(model, ex, PruningPlan(), _band(model, ex, 0.25))
    assert res.in_band
    blur = [m for m in pruned.modules() if type(m).__name__ == "BlurPool2d"]
    assert blur and all(m.channels is None and m.filt.shape[0] == 1 for m in blur)
    bundle = make_bundle(pruned, ModelSpec(name="resnetblur18", num_classes=10, input_size=64), res.plan,
                         space.pruning_history(), 64)
    again, _ = load_pruned(bundle_bytes(bundle))
    with torch.no_grad():
        assert torch.equal(again.eval()(ex), pruned.eval()(ex))


def test_attention_that_reads_its_width_from_the_input_is_tied_to_the_stream():
    """MetaFormer's Attention reshapes its output to the input's width (``reshape(B, N, C)``), like DaViT,
    Twins, PVT-v2 and CoaT: the attention's head dims and the residual stream feeding it are separate
    Torch-Pruning groups whose widths must match. They used to freeze (CAFormer floored at 33 % of its
    MACs); the trial cut now ties them, and the pair is cut to one width."""
    from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    torch.manual_seed(0)  # caformer_s18's layout, smaller
    model = MetaFormer(depths=(1, 1, 2, 1), dims=(16, 32, 64, 96), token_mixers=[SepConv, SepConv, Attention, Attention],
                       norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2, num_classes=10).eval()
    ex = example_input(64)
    space = PruningSpace.build(model, ex, PruningPlan())
    followers = {g.root for g in space.groups if g.root in space.ties}
    assert followers and all(g.attention for g in space.groups if g.root in followers)
    assert not [f for f in space.frozen if "token_mixer" in f.line()]
    # the MAC model follows the stream through its token layout (reshape + transpose) into the head's pool
    assert space.mac_model.exact
    pruned, res, _ = prune_to_target(model, ex, PruningPlan(), _band(model, ex, 0.3))
    assert res.in_band and res.prediction_exact
    attns = [m for m in pruned.modules() if type(m).__name__ == "Attention"]
    assert attns and all(a.qkv.out_features == 3 * a.qkv.in_features for a in attns)
    assert any(a.qkv.in_features < 64 for a in attns)  # the tied stages were cut
    with torch.no_grad():
        assert pruned(ex).shape == (1, 10)


def test_attention_that_names_its_head_count_heads_is_pruned_and_rebuilds():
    """Hiera's MaskUnitAttention says ``heads`` (not ``num_heads``) and reshapes to ``self.dim_out``: Torch-Pruning
    did not know its heads, every cut broke the reshape and all attention groups froze (floor 33 % of the MACs).
    With the alias its head dims are cut per head, its attributes follow, and the saved bundle rebuilds.
    Its mask-unit ``expand`` no longer makes Torch-Pruning divide by zero (a degenerate GQA mapping)."""
    model, ex = _load("hiera_tiny_224", 128)
    pruned, res, space = prune_to_target(model, ex, PruningPlan(), _band(model, ex, 0.25))
    assert res.in_band and not res.frozen_groups  # nor its mask-unit expands (read as GQA repeats of size 0)
    cut = [(a, b.attn) for a, b in zip(model.blocks, pruned.blocks) if b.attn.qkv.out_features < a.attn.qkv.out_features]
    assert cut and all(b.qkv.out_features == 3 * b.heads * b.head_dim == 3 * b.dim_out < 3 * a.attn.dim_out
                       for a, b in cut)
    bundle = make_bundle(pruned, ModelSpec(name="hiera_tiny_224", num_classes=10, input_size=128), res.plan,
                         space.pruning_history(), 128, attention_heads=space.attention_heads())
    again, _ = load_pruned(bundle_bytes(bundle))
    with torch.no_grad():
        assert torch.equal(again.eval()(ex), pruned.eval()(ex))


def test_a_deep_budget_below_the_old_global_floor_is_reached():
    """EdgeNeXt at 25 %: global ranking gave its wide MLP groups more than their cap and lost the excess, so
    every cut stopped at 27 % of the MACs (at 128 px, ImageNet head); what a capped group cannot take now goes
    to the next-lowest channels of the other groups, and the budget is reached."""
    torch.manual_seed(0)
    model, ex = load_model(ModelSpec(name="edgenext_small", input_size=128)), example_input(128)
    pruned, res, _ = prune_to_target(model, ex, PruningPlan(), _band(model, ex, 0.25))
    assert res.in_band
    with torch.no_grad():
        assert pruned(ex).shape == (1, 1000)
