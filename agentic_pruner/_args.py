"""What the sub-commands share: the user-error type, option groups, and building a model, plan and band
from the parsed flags. Imported by ``cli``, ``search_cli`` and ``llm_cli`` (never the other way round)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pruning.errors import UserError

EXIT_USAGE = 2  #: user mistakes
EXIT_BUG = 1  #: anything else


class CliError(UserError):
    """A user mistake found by the command line itself: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <command>: <what>`` (exit 2), the usage only with ``-h``."""

    def error(self, message: str):
        log(f"error: {self.prog}: {message} (see {self.prog} -h)")
        raise SystemExit(EXIT_USAGE)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llm_url(url: str | None) -> str | None:
    """``--llm-base-url``: credentials in it go to this process's environment only; configs store it redacted."""
    from pruning.redact import has_credentials

    if has_credentials(url):
        os.environ["AGENTIC_PRUNER_LLM_BASE_URL"] = url
    return url


def output_file(text: str) -> Path:
    """argparse ``type`` of an output file: not a directory, and under a directory that exists or can be made."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory; give a file path inside it")
    _creatable(path.parent)
    return path


def output_dir(text: str) -> Path:
    """argparse ``type`` of an output directory: not an existing file, and creatable."""
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a directory")
    _creatable(path)
    return path


def _creatable(path: Path) -> None:
    """The nearest existing ancestor of ``path`` is a writable directory."""
    probe = path.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write under {probe} (permission denied)")


def device_option(text: str) -> str:
    """argparse ``type`` of ``--device``: a device name that exists on this machine (``--device cuda`` without
    CUDA fails while the command line is parsed: one line, exit 2, before any work)."""
    from pruning.device import DeviceError, check_device_spec, resolve_device

    try:
        spec = check_device_spec(text)
        resolve_device(spec)
    except DeviceError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--device {text.strip().lower()}: ")) from None
    return spec


def require_device(spec: str, where: str) -> str:
    """``spec`` (a device stored in a run's config) if it exists here, else a :class:`CliError` naming ``where``."""
    from pruning.device import DeviceError, resolve_device

    try:
        resolve_device(spec)
    except DeviceError as exc:
        raise CliError(f"{where} asks for --device {spec}, {str(exc).split(': ', 1)[-1]}") from None
    return spec


def add_device_arg(p: argparse.ArgumentParser, what: str = "calibration, fine-tuning and evaluation") -> None:
    """``--device auto|cpu|cuda|cuda:N`` (None when not given: the config's default, auto)."""
    p.add_argument("--device", type=device_option, metavar="DEVICE",
                   help=f"where {what} run: auto (default: CUDA when available), cpu, cuda or cuda:N")


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
    p.add_argument("--target-macs", required=required,
                   help="MAC budget per image: absolute (2.06G, 500M) or relative to the model (50%%)")
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


def band_from_args(args, model=None, example=None):
    """The MAC band of ``--target-macs`` (absolute, or ``N%`` of ``model``'s MACs at ``example``'s size).

    Without a model a relative target is only checked for its form (malformed input fails before any work)."""
    from pruning.solver import MacBand
    from pruning.space import count_macs_params
    from pruning.units import parse_target

    absolute, fraction = parse_target(args.target_macs)
    if absolute is None:
        absolute = count_macs_params(model, example)[0] * fraction if model is not None else 1.0
    return MacBand(target_macs=absolute, overshoot_pct=args.overshoot, undershoot_pct=args.undershoot)
