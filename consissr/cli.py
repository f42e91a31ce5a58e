"""``consissr <stage>``: thin commands over plain functions (DVC stages and Prefect flows call these).

Every subcommand takes ``--params FILE`` (default ``params.yaml``) and ``--set key=value``
overrides (dotted keys, YAML values), and reads only its own params sections. The project's own
errors (``consissr.errors``) and a missing file print one line and exit with code 2; anything
else keeps its traceback (exit code 1).
"""

from __future__ import annotations

import argparse
import logging
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


@stage("train-vae", "train the embedded backbone's tiny VAE on the training photos (embedded profile only)")
def _train_vae_args(p):
    _paths(p, out="data/models/vae")


def run_train_vae(params: Params, args) -> None:
    from consissr.training.vae_stage import train_vae

    prepare = params.prepare
    train_vae(args.out, pretrained=params.backbone.pretrained, sources=prepare.sources, extensions=prepare.extensions,
              eval_dirs=prepare.eval_dirs, train=params.train_vae, seed=params.base.seed, device=params.base.device)


@stage("backbone", "build and save the embedded tiny SD backbone (or record the real one's id)")
def _backbone_args(p):
    _paths(p, vae="data/models/vae", out="data/models/backbone")


def run_backbone(params: Params, args) -> None:
    from consissr.models.backbone import write_backbone

    write_backbone(params.backbone, out_dir=args.out, seed=params.base.seed, vae_dir=args.vae)


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


@stage("vae-ceiling", "reconstruction PSNR(Y) of the backbone's VAE on the HQ crops vs bicubic x4 of the LQ")
def _vae_ceiling_args(p):
    _paths(p, prepared="data/prepared", degraded="data/degraded", backbone="data/models/backbone",
           out="data/reports/vae_ceiling.json")


def run_vae_ceiling(params: Params, args) -> None:
    from consissr.training.vae_stage import vae_ceiling

    vae_ceiling(args.prepared, args.degraded, args.backbone, args.out, backbone=params.backbone,
                device=params.base.device)


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


@stage("model-info", "print parameter counts per part (both profiles) and how the saved model was trained")
def _model_info_args(p):
    _paths(p, backbone="data/models/backbone", model="data/models/consissr")
    p.add_argument("--profile", choices=["tiny", "paper", "both"], default="both")


def run_model_info(params: Params, args) -> None:
    from consissr.models.info import print_model_info

    print_model_info(params, profile=args.profile, backbone_dir=args.backbone, model_dir=args.model)


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
