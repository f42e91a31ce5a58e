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

from consissr.config import Params, load_params, read_yaml
from consissr.errors import ConsisSRError, ParamsError

log = logging.getLogger("consissr")

STAGES: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}
TOOLS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}  # no params file: upscale, demo


def stage(name: str, help: str, *, registry: dict = STAGES):
    def deco(fn):
        registry[name] = (help, fn)
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

    prepare(params.prepare, out_dir=args.out, seed=params.base.seed, parallel=params.parallel)


@stage("degrade", "Real-ESRGAN second-order degradation of the prepared crops")
def _degrade_args(p):
    _paths(p, input="data/prepared", out="data/degraded")


def run_degrade(params: Params, args) -> None:
    from consissr.data.degradation import degrade_folder

    degrade_folder(args.input, args.out, params.degrade, seed=params.base.seed, parallel=params.parallel)


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
                 device=params.base.device, backbone_dir=args.backbone, parallel=params.parallel)


@stage("train-clip", "fine-tune the robust CLIP student on LQ/HQ pairs (Eq. 3); resumes from checkpoints/")
def _train_clip_args(p):
    _paths(p, prepared="data/prepared", degraded="data/degraded", out="data/models/robust_clip")


def run_train_clip(params: Params, args) -> None:
    from consissr.training.clip_stage import train_clip

    train_clip(args.prepared, args.degraded, args.out, clip=params.clip, train=params.train_clip,
               seed=params.base.seed, device=params.base.device)


@stage("embed-clip", "write the robust CLIP student's LQ embeddings as shards beside the latents")
def _embed_clip_args(p):
    _paths(p, latents="data/latents", degraded="data/degraded", robust_clip="data/models/robust_clip",
           out="data/embeddings")


def run_embed_clip(params: Params, args) -> None:
    from consissr.data.embedding_cache import embed_lq_images

    embed_lq_images(args.latents, args.degraded, args.robust_clip, args.out, embed=params.embed_clip,
                    device=params.base.device)


@stage("train-sdsr", "train ConsisSR on the cached latents with TALA (Algorithm 1); resumes from checkpoints/")
def _train_sdsr_args(p):
    _paths(p, latents="data/latents", degraded="data/degraded", backbone="data/models/backbone",
           robust_clip="data/models/robust_clip", out="data/models/consissr")
    p.add_argument("--embeddings", type=Path, default=None,
                   help="the embed-clip cache (read per batch); without it every LQ image is embedded up front")


def run_train_sdsr(params: Params, args) -> None:
    from consissr.training.sdsr_stage import train_sdsr

    train_sdsr(args.latents, args.degraded, args.out, backbone_dir=args.backbone, robust_clip_dir=args.robust_clip,
               backbone=params.backbone, model=params.model, train=params.train_sdsr, seed=params.base.seed,
               device=params.base.device, embeddings_dir=args.embeddings)


@stage("train-gan", "the GAN for GAN-Embedding mode: check and record gan.pretrained, or fit / fine-tune it with L1")
def _train_gan_args(p):
    _paths(p, prepared="data/prepared", degraded="data/degraded", out="data/models/gan")


def run_train_gan(params: Params, args) -> None:
    from consissr.training.gan_stage import train_gan

    train_gan(args.prepared, args.degraded, args.out, gan=params.gan, train=params.train_gan,
              scale=params.degrade.scale, seed=params.base.seed, device=params.base.device)


@stage("evaluate", "Tables 1-2 and Fig. 10: the paper's methods and metrics on every evaluate.datasets entry")
def _evaluate_args(p):
    _paths(p, prepared="data/prepared", metrics="metrics", plots="plots/evaluate", report="reports/evaluate",
           work="data/eval")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="a saved ConsisSRPipeline folder (default: assembled from data/models/*)")


def run_evaluate(params: Params, args) -> None:
    from consissr.evaluation.stage import evaluate

    evaluate(params.evaluate, degrade=params.degrade, inference=params.inference, seed=params.base.seed,
             device=params.base.device,
             metrics_dir=args.metrics, plots_dir=args.plots, report_dir=args.report, work_dir=args.work,
             prepared_dir=args.prepared, pipeline_dir=args.pipeline)


@stage("model-info", "print parameter counts per part (both profiles), how the saved model was trained and "
       "where the robust CLIP's and the GAN's weights come from")
def _model_info_args(p):
    _paths(p, backbone="data/models/backbone", model="data/models/consissr", gan="data/models/gan",
           robust_clip="data/models/robust_clip")
    p.add_argument("--profile", choices=["tiny", "paper", "both"], default="both")


def run_model_info(params: Params, args) -> None:
    from consissr.models.info import print_model_info

    print_model_info(params, profile=args.profile, backbone_dir=args.backbone, model_dir=args.model,
                     gan_dir=args.gan, robust_clip_dir=args.robust_clip)


# ---------------------------------------------------------------------------------------------
# tools for a person with a picture (TOOLS: no params file needed)
# ---------------------------------------------------------------------------------------------
def _model_args(p) -> None:
    p.add_argument("--model", type=Path, default=None,
                   help="a saved pipeline folder (default: the stage outputs under data/models/)")
    p.add_argument("--device", default="auto")


def _sampling_args(p) -> None:
    _model_args(p)
    p.add_argument("--mode", choices=["full", "ganemb", "gan"], default=None,
                   help="§3.1 full | Algorithm 2 GAN-Embedding | gan: Real-ESRGAN alone (a real result on a CPU)")
    p.add_argument("--preset", choices=["rec", "gen"], default=None, help="GANEmb preset of Table 2")
    p.add_argument("--steps", dest="num_inference_steps", type=int, default=None)
    p.add_argument("--t-max", dest="t_max", type=int, default=None, help="GANEmb start timestep (1..1000)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--guidance", dest="guidance_scale", type=float, default=None, help="1 = off")
    p.add_argument("--hpa-scale", type=float, default=None, help="hybrid prompt adapter image weight")
    p.add_argument("--color-fix", choices=["adain", "wavelet", "none"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=None, help="output pixels per tile")


def _sampling_options(args):
    from consissr.inference.upscale import UpscaleOptions

    return UpscaleOptions(**{k: getattr(args, k) for k in UpscaleOptions.__dataclass_fields__})


@stage("upscale", "super-resolve image files and folders (alpha, gray, 16-bit, EXIF kept) into OUTDIR",
       registry=TOOLS)
def _upscale_args(p):
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="OUTDIR")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger inputs (default: PIL's 89.5 Mpx)")
    _sampling_args(p)


def _load_pipeline(args):
    """``--model DIR`` (a saved pipeline, its own defaults), else the stage outputs with the ``inference``
    section of ``--params`` (when that file exists) as the defaults."""
    from consissr.inference.pipeline import load_pipeline

    if args.model is None and args.params.is_file():
        return load_pipeline(None, device=args.device, defaults=load_params(args.params).inference)
    return load_pipeline(args.model, device=args.device)


def run_upscale(args) -> int:
    from consissr.data.images import DEFAULT_MAX_PIXELS
    from consissr.inference.upscale import upscale_files

    pipe = _load_pipeline(args)
    report = upscale_files(pipe, args.inputs, args.out, _sampling_options(args), overwrite=args.overwrite,
                           max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
    for bad in report.failed:
        print(f"consissr upscale: {bad['path']}: {bad['reason']}", file=sys.stderr)
    print(f"consissr upscale: {len(report.written)} written to {args.out}, {len(report.failed)} failed")
    return 0 if report.ok else 1


@stage("demo", "a local web page (Gradio) to upscale one image with the knobs and a before/after view",
       registry=TOOLS)
def _demo_args(p):
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    _model_args(p)


def run_demo(args) -> int:
    from consissr.inference.demo import launch

    launch(_load_pipeline(args), host=args.host, port=args.port)
    return 0


@stage("fidelity", "the fidelity experiment: TALA vs DDPM (Fig. 8, Table 4) and Fig. 10, resumable",
       registry=TOOLS)
def _fidelity_args(p):
    p.add_argument("--budget", choices=("cpu", "cuda", "test"), default="cpu",
                   help="cpu: ~90 min on 2 cores; cuda: ~10 min on one H100; test: seconds, tiny")
    p.add_argument("--out", type=Path, required=True, help="run folder (state.json, figures, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (done phases are skipped)")
    _paths(p, backbone="data/models/backbone", robust_clip="data/models/robust_clip")
    p.add_argument("--seed", type=int, default=2024, help="data seed (crops, degradations)")
    p.add_argument("--shared-data", type=Path, default=Path("../shared/data"),
                   help="folder with train/CBSD68, test/Set5, test/Set14 (absent: the embedded photos)")


def run_fidelity(args) -> int:
    from consissr.experiments.fidelity import run_fidelity as run

    state = run(args.budget, args.out, resume=args.resume, backbone_dir=args.backbone,
                robust_clip_dir=args.robust_clip, seed=args.seed, shared_data=args.shared_data)
    done = [k for k, v in state["phases"].items() if v.get("done")]
    print(f"consissr fidelity: phases done: {', '.join(done)}; results in {args.out}")
    return 0


@stage("promote", "log the pipeline as an MLflow model, register a version, move the champion alias by the rule",
       registry=TOOLS)
def _promote_args(p):
    p.add_argument("--config", type=Path, default=Path("configs/retrain.yaml"), help="flow settings with the rule")
    p.add_argument("--model-dir", type=Path, default=None, help="a saved pipeline folder (default: the stage outputs)")


def run_promote(args) -> int:
    from consissr.promote import promote

    decision = promote(args.config, model_dir=args.model_dir, profile=os.environ.get("CONSISSR_PROFILE"))
    print(f"version {decision.version}: {'promoted' if decision.promote else 'kept the champion'} "
          f"({'; '.join(decision.reasons)})")
    return 0


@stage("convert-checkpoint", "the authors' released ConsisSR.ckpt -> a saved pipeline folder (upscale --model)",
       registry=TOOLS)
def _convert_checkpoint_args(p):
    p.add_argument("checkpoint", type=Path, help="their PyTorch-Lightning checkpoint (ConsisSR.ckpt)")
    p.add_argument("out", type=Path, help="the pipeline folder to write")
    p.add_argument("--config-dir", type=Path, default=None,
                   help="SD-layout configs (unet/ vae/ text_encoder/); default: the packaged SD 2.1-base")
    p.add_argument("--clip-model", default="ViT-H-14", help="open_clip architecture of their image tower")


def run_convert_checkpoint(args) -> int:
    from consissr.models.convert_authors import convert_authors_checkpoint

    out = convert_authors_checkpoint(args.checkpoint, args.out, config_dir=args.config_dir,
                                     clip_model_name=args.clip_model)
    print(f"consissr convert-checkpoint: wrote {out}")
    return 0


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
        out[key] = read_yaml(value)
    return out


# stages whose code opens no MLflow run of its own (the training and evaluate stages do): every
# stage is a run (docs/orchestration.md), with its params, its inputs' hashes and its report's counts
TRACKED_HERE = ("backbone", "prepare", "degrade", "encode", "embed-clip")
REPORTS = ("report.json", "manifest.json")


def _run_tracked(command: str, runner: Callable, params: Params, args) -> None:
    from consissr import tracking
    from consissr.config import STAGE_PARAMS, section

    stage = command.replace("-", "_")
    sections = {dotted: section(params, dotted) for dotted in STAGE_PARAMS[stage]}
    inputs = {k: v for k, v in vars(args).items() if isinstance(v, Path) and k not in ("out", "params")}
    with tracking.start_run(stage, params=sections, inputs=inputs) as run:
        runner(params, args)
        for name in REPORTS:
            report = Path(args.out) / name
            if report.is_file():
                counts = yaml.safe_load(report.read_text())  # JSON is YAML
                run.log_metrics({k: float(v) for k, v in counts.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
                run.log_metrics({f"{k}_count": float(len(v)) for k, v in counts.items()  # lists of records, not shapes
                                 if isinstance(v, list) and not all(isinstance(x, (int, float)) for x in v)}, step=0)
                run.log_artifact(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="consissr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args) in STAGES.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a dotted param")
        p.add_argument("-v", "--verbose", action="store_true")
        add_args(p)
    for name, (help_text, add_args) in TOOLS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-v", "--verbose", action="store_true")
        p.add_argument("--params", type=Path, default=Path("params.yaml"),
                       help="its `inference` section gives the defaults without --model (used when it exists)")
        add_args(p)
    args = parser.parse_args(argv)
    _relaunch_distributed(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import consissr.compat  # noqa: F401  (third-party workarounds, before any command's code imports diffusers)
    try:
        runner = globals()["run_" + args.command.replace("-", "_")]
        if args.command in TOOLS:
            return runner(args)
        params = load_params(args.params, _parse_overrides(args.set))
        # the MLflow runs' `profile` tag (tracking.start_run); the Prefect flow sets it itself
        os.environ.setdefault("CONSISSR_PROFILE", "embedded" if params.backbone.pretrained == "embedded" else "paper")
        if args.command in TRACKED_HERE:
            _run_tracked(args.command, runner, params, args)
        else:
            runner(params, args)
    except (ConsisSRError, FileNotFoundError) as exc:  # what the user can fix: one line, no traceback
        print(f"consissr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
