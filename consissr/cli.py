"""``consissr <stage>``: thin commands over plain functions (DVC stages and Prefect flows call these).

Every subcommand takes ``--params FILE`` (default ``params.yaml``) and ``--set key=value``
overrides (dotted keys, YAML values), and reads only its own params sections. The project's own
errors (``consissr.errors``) and a missing file print one line and exit with code 2; anything
else keeps its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

import yaml

from consissr.config import Params, load_params
from consissr.errors import ConsisSRError, ParamsError

log = logging.getLogger("consissr")

STAGES: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}


def stage(name: str, help: str):
    def deco(fn):
        STAGES[name] = (help, fn)
        return fn
    return deco


def _paths(p: argparse.ArgumentParser, **defaults: str) -> None:
    for key, default in defaults.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=Path, default=Path(default))


@stage("backbone", "build and save the embedded tiny SD backbone (or record the real one's id)")
def _backbone_args(p):
    _paths(p, out="data/models/backbone")


def run_backbone(params: Params, args) -> None:
    from consissr.models.backbone import write_backbone

    write_backbone(params.backbone, out_dir=args.out, seed=params.base.seed)


@stage("prepare", "HQ crops from the sources, with a skip report and the contamination guard")
def _prepare_args(p):
    _paths(p, out="data/prepared")


def run_prepare(params: Params, args) -> None:
    from consissr.data.sources import prepare

    prepare(params.prepare, out_dir=args.out, seed=params.base.seed)


@stage("degrade", "Real-ESRGAN second-order degradation of the prepared crops")
def _degrade_args(p):
    _paths(p, input="data/prepared", out="data/degraded")


def run_degrade(params: Params, args) -> None:
    from consissr.data.degradation import degrade_folder

    degrade_folder(args.input, args.out, params.degrade, seed=params.base.seed)


@stage("encode", "VAE-encode LQ/HQ pairs into safetensors latent shards")
def _encode_args(p):
    _paths(p, prepared="data/prepared", degraded="data/degraded", backbone="data/models/backbone",
           out="data/latents")


def run_encode(params: Params, args) -> None:
    from consissr.data.latent_cache import encode_pairs

    encode_pairs(args.prepared, args.degraded, args.out, encode=params.encode, backbone=params.backbone,
                 device=params.base.device, backbone_dir=args.backbone)


@stage("train-clip", "fine-tune the robust CLIP student on LQ/HQ pairs (Eq. 3); resumes from checkpoints/")
def _train_clip_args(p):
    _paths(p, prepared="data/prepared", degraded="data/degraded", out="data/models/robust_clip")


def run_train_clip(params: Params, args) -> None:
    from consissr.training.clip_stage import train_clip

    train_clip(args.prepared, args.degraded, args.out, clip=params.clip, train=params.train_clip,
               seed=params.base.seed, device=params.base.device)


@stage("train-sdsr", "train ConsisSR on the cached latents with TALA (Algorithm 1); resumes from checkpoints/")
def _train_sdsr_args(p):
    _paths(p, latents="data/latents", degraded="data/degraded", backbone="data/models/backbone",
           robust_clip="data/models/robust_clip", out="data/models/consissr")


def run_train_sdsr(params: Params, args) -> None:
    from consissr.training.sdsr_stage import train_sdsr

    train_sdsr(args.latents, args.degraded, args.out, backbone_dir=args.backbone, robust_clip_dir=args.robust_clip,
               backbone=params.backbone, model=params.model, train=params.train_sdsr, seed=params.base.seed,
               device=params.base.device)


@stage("model-info", "print total and trainable parameter counts per part (both profiles)")
def _model_info_args(p):
    _paths(p, backbone="data/models/backbone")
    p.add_argument("--profile", choices=["tiny", "paper", "both"], default="both")


def run_model_info(params: Params, args) -> None:
    from consissr.models.info import print_model_info

    print_model_info(params, profile=args.profile, backbone_dir=args.backbone)


@stage("promote", "log the pipeline as an MLflow model, register a version, move the champion alias by the rule")
def _promote_args(p):
    p.add_argument("--config", type=Path, default=Path("configs/retrain.yaml"), help="flow settings with the rule")
    p.add_argument("--model-dir", type=Path, default=None, help="a saved pipeline folder (default: the stage outputs)")


def run_promote(params: Params, args) -> None:
    from consissr.promote import promote

    promote(args.config, model_dir=args.model_dir, profile=os.environ.get("CONSISSR_PROFILE"))


def _relaunch_distributed(argv: list[str]) -> None:
    """A training command under ``CONSISSR_NUM_PROCESSES`` > 1 re-executes itself through ``accelerate launch``.

    DVC stages keep their plain ``consissr train-...`` command (dvc.lock records it); a GPU worker sets the
    process count (Prefect job variable ``CONSISSR_NUM_GPUS`` -> the flow's env).
    """
    count = int(os.environ.get("CONSISSR_NUM_PROCESSES", "1") or 1)
    if count <= 1 or "LOCAL_RANK" in os.environ or not argv or not argv[0].startswith("train-"):
        return
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
           "-m", "consissr.cli", *argv]
    log.info("relaunching through accelerate: %s", " ".join(cmd))
    os.execv(sys.executable, cmd)


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(f"--set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="consissr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted param")
        p.add_argument("-v", "--verbose", action="store_true")
        add_args(p)
    args = parser.parse_args(argv)
    _relaunch_distributed(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params, _parse_overrides(args.set))
        runner = globals()["run_" + args.command.replace("-", "_")]
        runner(params, args)
    except (ConsisSRError, FileNotFoundError) as exc:  # what the user can fix: one line, no traceback
        print(f"consissr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
