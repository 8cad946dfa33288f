"""What the sub-commands share: the user-error type, option groups, and building a model, plan and band
from the parsed flags. Imported by ``cli``, ``search_cli`` and ``llm_cli`` (never the other way round)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pruning.errors import UserError

EXIT_USAGE = 2  #: user mistakes
EXIT_BUG = 1  #: anything else


class CliError(UserError):
    """A user mistake found by the command line itself: printed as one line, exit code 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def kv_floats(items: list[str] | None, flag: str) -> dict[str, float]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise CliError(f"{flag} expects NAME=NUMBER, got '{item}'")
    return out


# ----------------------------------------------------------------------------------------------
# shared option groups
# ----------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="timm model name, e.g. resnet50, convnext_small, deit_tiny_patch16_224")
    p.add_argument("--checkpoint", type=Path, help="state dict to load (read with weights_only=True)")
    p.add_argument("--num-classes", type=int, help="classifier width (default: the architecture's)")
    p.add_argument("--pretrained", action="store_true", help="download hub weights (needs internet)")
    p.add_argument("--input-size", type=int, help="square input resolution (default: the model's config)")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--importance", default="l2", choices=["l1", "l2", "random", "taylor"],
                   help="channel importance (taylor needs calibration data)")
    p.add_argument("--allocation", default="global", choices=["global", "uniform"])
    p.add_argument("--round-to", type=int, default=8, help="kept channels are multiples of this")
    p.add_argument("--max-layer-ratio", type=float, default=0.9, help="no group loses more than this fraction")
    p.add_argument("--stage-mult", action="append", metavar="STAGE=X", help="per-stage multiplier (repeatable)")
    p.add_argument("--kind-mult", action="append", metavar="KIND=X",
                   help="per-kind multiplier: internal, residual, mlp, qkv, head, proj (repeatable)")
    p.add_argument("--seed", type=int, default=0)


def add_band_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--target-macs", required=required, help="MAC budget per image, e.g. 2.06G or 500M")
    p.add_argument("--overshoot", type=float, default=5.0, help="allowed %% above target (default 5)")
    p.add_argument("--undershoot", type=float, default=15.0, help="allowed %% below target (default 15)")


def model_spec(args):
    from pruning.models import ModelSpec

    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise CliError(f"checkpoint not found: {args.checkpoint}")
    return ModelSpec(name=args.model, num_classes=args.num_classes, checkpoint=args.checkpoint,
                     pretrained=args.pretrained, input_size=args.input_size)


def load_model_from_args(args):
    from pruning.models import default_input_size, load_model
    from pruning.space import example_input

    spec = model_spec(args)
    log(f"loading {spec.name}" + (f" from {spec.checkpoint}" if spec.checkpoint else " (random init)" if not spec.pretrained else " (pretrained)"))
    model = load_model(spec)
    size = args.input_size or default_input_size(model)
    return spec, model, size, example_input(size)


def plan_from_args(args):
    from pruning.plan import PruningPlan

    return PruningPlan(importance=args.importance, allocation=args.allocation, round_to=args.round_to,
                       max_layer_ratio=args.max_layer_ratio,
                       stage_multipliers=kv_floats(args.stage_mult, "--stage-mult"),
                       kind_multipliers=kv_floats(args.kind_mult, "--kind-mult"))


def band_from_args(args):
    from pruning.solver import MacBand
    from pruning.units import parse_macs

    return MacBand(target_macs=parse_macs(args.target_macs), overshoot_pct=args.overshoot,
                   undershoot_pct=args.undershoot)
