"""Does TALA do what the paper says? Fig. 8, Table 4 and Fig. 10 in one seeded experiment.

Phases, each checkpointed in ``<out>/state.json`` so a killed run resumes where it stopped:
``data`` (train crops → degrade → latent cache; Set5/Set14 test crops degraded with the seed),
``base`` (the tiny UNet + ControlNet + adapters trained from scratch with plain DDPM until 50-step
samples beat bicubic PSNR on the test crops, or the budget ends: then the run stops with the
learning curve), ``finetune`` (TALA γ=10 and DDPM from the base, same steps, ≥ 2 seeds; the
paper's trainable policy), ``fig8`` (PSNR/SSIM of the decoded x̂0 at every sampling step),
``table4`` (γ ∈ {5, 20} beside them), ``fig10`` (GAN-Embedding t_max × steps with the TALA model).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consissr.config import (
    BackboneParams,
    DegradeParams,
    EncodeParams,
    EvalDatasetParams,
    EvaluateParams,
    GanParams,
    ModelParams,
    PrepareParams,
    TrainGanParams,
)
from consissr.errors import InputError, ParamsError
from consissr.io import atomic_dir, atomic_path, file_sha256, write_json

log = logging.getLogger(__name__)

STATE = "state.json"
SCHEMA = "consissr.fidelity/1"
SHARED = Path("../shared/data")  # the sample photos beside the repo, never inside (default --shared-data)


@dataclass(frozen=True)
class Budget:
    """Sizes of one run. ``None`` sources: CBSD68 / Set5+Set14 from ../shared/data when present."""

    name: str
    train_sources: tuple[str, ...] | None = None
    train_crop: int = 96  # HQ training crop side (latent side = / VAE factor)
    crops_per_image: int = 8
    test_sets: tuple[str, ...] | None = None  # HR folders (synthetic), or ("embedded",)
    test_crops_per_set: int = 4
    lr_crop: int = 24  # test LQ crop; HQ = 4 × it
    unet_channels: tuple[int, ...] | None = None  # None: the backbone's UNet (re-initialised by seed)
    batch: int = 8
    base_lr: float = 5e-4
    base_eval_every: int = 250  # steps between learning-curve points
    base_max_steps: int = 3000
    base_max_seconds: float = 2700.0  # CPU seconds of this process (fair on a shared machine); GPU: wall
    require_base: bool = True  # stop after the base when it does not beat bicubic
    finetune_lr: float = 1e-4
    finetune_steps: int = 300
    gamma: float = 10.0
    train_seeds: tuple[int, ...] = (0, 1)
    sample_seeds: tuple[int, ...] = (0, 1, 2)
    sample_steps: int = 50  # §3.1: 50 spaced DDPM steps
    table4_gammas: tuple[float, ...] = (5.0, 20.0)
    sweep_t_max: tuple[int, ...] = (600, 700, 800, 900, 1000)
    sweep_steps: tuple[int, ...] = (5, 10, 20)
    nr_metric: str = "piqe"  # offline no-reference metric (NIQE needs HQ ≥ 192²)
    threads: int = 1  # CPU threads (0: torch's default)
    device: str = "cpu"


BUDGETS: dict[str, Budget] = {
    # every phase on a few embedded crops (the slow end-to-end test: minutes on 2 cores)
    "test": Budget("test", train_sources=("embedded",), train_crop=80, crops_per_image=1, test_sets=("embedded",),
                   test_crops_per_set=2, lr_crop=20, batch=2, base_eval_every=2, base_max_steps=2,
                   require_base=False, finetune_steps=2, sample_steps=3, table4_gammas=(5.0,),
                   sweep_t_max=(600, 1000), sweep_steps=(2,), threads=0),
    # ~90 minutes of one CPU thread (the base counts process time; wall time is longer on a shared machine):
    # the tiny backbone UNet shape, 96² crops
    "cpu": Budget("cpu", base_max_steps=4000),
    # 10 minutes on one H100 (an estimate: not yet run on one): a 17.7M-parameter UNet, batch 32, 128² crops,
    # more steps and crops, 192² test crops (NIQE)
    "cuda": Budget("cuda", train_crop=128, crops_per_image=12, test_crops_per_set=6, lr_crop=48,
                   unet_channels=(64, 128, 256), batch=32, base_lr=3e-4, base_eval_every=1000,
                   base_max_steps=8000, base_max_seconds=240.0, finetune_steps=800, nr_metric="niqe",
                   threads=0, device="cuda"),
}


# --------------------------------------------------------------------------------------------
# run state: one JSON file, rewritten atomically after every phase / seed
# --------------------------------------------------------------------------------------------
class RunState:
    def __init__(self, out: Path, budget: Budget, *, resume: bool) -> None:
        self.path = out / STATE
        config = json.loads(json.dumps(dataclasses.asdict(budget)))
        if self.path.is_file():
            if not resume:
                raise InputError(f"{self.path}: a run is already here; pass --resume to continue it, "
                                 "or choose another --out")
            self.data = json.loads(self.path.read_text())
            if self.data.get("budget") != config:
                raise InputError(f"{self.path}: recorded with budget {self.data.get('budget', {}).get('name')!r} "
                                 f"and other sizes; resume it with the same --budget")
        else:
            self.data = {"schema": SCHEMA, "budget": config, "phases": {}, "invocations": 0}
        self.data["invocations"] += 1
        self.save()

    def done(self, key: str) -> dict | None:
        entry = self.data["phases"].get(key)
        return entry if entry and entry.get("done") else None

    def set(self, key: str, value: dict) -> None:
        """Record a phase (``invocation``: the run invocation that wrote it; a resumed run keeps it)."""
        self.data["phases"][key] = dict(value, invocation=self.data["invocations"])
        self.save()

    def get(self, key: str) -> dict:
        return self.data["phases"].get(key, {})

    def save(self) -> None:
        write_json(self.path, self.data)


class BaseStop(Exception):
    """Raised from the base's evaluation hook to end base training (reason in ``args[0]``)."""


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def default_sources(budget: Budget, shared: Path = SHARED) -> tuple[tuple[str, ...], list[EvalDatasetParams]]:
    train = budget.train_sources
    if train is None:
        cbsd = shared / "train" / "CBSD68"
        train = (str(cbsd.resolve()),) if cbsd.is_dir() else ("embedded",)
    names = budget.test_sets
    if names is None:
        found = [str((shared / "test" / n).resolve()) for n in ("Set5", "Set14") if (shared / "test" / n).is_dir()]
        names = tuple(found) or ("embedded",)
    tests = [EvalDatasetParams(name="embedded", kind="embedded", count=budget.test_crops_per_set) if n == "embedded"
             else EvalDatasetParams(name=Path(n).name, kind="synthetic", hr=n, count=budget.test_crops_per_set)
             for n in names]
    return train, tests


def build_data(out: Path, budget: Budget, *, backbone_dir: Path, seed: int, shared: Path = SHARED) -> dict:
    """``prepare`` → ``degrade`` → ``encode`` of the training crops, and the degraded test crops."""
    from consissr.data.degradation import degrade_folder
    from consissr.data.latent_cache import encode_pairs
    from consissr.data.sources import prepare
    from consissr.evaluation.datasets import build_set
    from consissr.evaluation.stage import check_contamination, materialise

    train, tests = default_sources(budget, shared)
    data = out / "data"
    prepare(PrepareParams(sources=train, crop_size=budget.train_crop, crops_per_image=budget.crops_per_image),
            out_dir=data / "prepared", seed=seed)
    degrade_folder(data / "prepared", data / "degraded", DegradeParams(), seed=seed)
    encode_pairs(data / "prepared", data / "degraded", data / "latents", encode=EncodeParams(),
                 backbone=BackboneParams(), device=_device(budget), backbone_dir=backbone_dir)
    ev = EvaluateParams(datasets=tuple(tests), lr_crop=budget.lr_crop)
    sets = [build_set(entry, ev, DegradeParams(), seed) for entry in tests]
    check_contamination(sets, data / "prepared" / "index.json")
    with atomic_dir(data / "test") as tmp:
        ids = {s.name: materialise(s, tmp / s.name) for s in sets}
    return {"done": True, "train_sources": list(train), "test_sets": ids, "frozen": frozen_parts(backbone_dir)}


def frozen_parts(backbone_dir: Path) -> dict[str, str]:
    """Hash of the VAE the latents were encoded with (checked on every resume; the loop's own
    fingerprint covers the robust CLIP and the latents)."""
    return {"vae": file_sha256(backbone_dir / "vae" / "diffusion_pytorch_model.safetensors")}


def check_frozen(recorded: dict | None, backbone_dir: Path) -> None:
    if not recorded:
        log.warning("fidelity: this run recorded no backbone hash; not checking that its VAE is unchanged")
        return
    if frozen_parts(backbone_dir)["vae"] != recorded["vae"]:
        raise InputError(f"{backbone_dir}: its VAE differs from the one this run's latents were encoded with; "
                         "resume with the same --backbone (or start a new run)")


def load_test_crops(out: Path) -> list[dict]:
    """Every test crop: ``{"set", "id", "lq" (float HxWx3), "hq" (uint8)}``."""
    from consissr.data.layout import read_rgb_array

    crops = []
    for folder in sorted(p for p in (out / "data" / "test").iterdir() if p.is_dir()):
        for item in json.loads((folder / "index.json").read_text())["items"]:
            crops.append({"set": folder.name, "id": item["id"],
                          "lq": read_rgb_array(folder / "lq" / f"{item['id']}.png").astype(np.float32) / 255.0,
                          "hq": read_rgb_array(folder / "hq" / f"{item['id']}.png")})
    return crops


def _device(budget: Budget) -> str:
    if budget.device == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"fidelity --budget {budget.name} needs a CUDA GPU; use --budget cpu here")
    return budget.device


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class Parts:
    """The frozen parts, loaded once: backbone (VAE, text encoder, scheduler), robust CLIP, data tables."""

    def __init__(self, out: Path, budget: Budget, *, backbone_dir: Path, robust_clip_dir: Path) -> None:
        from consissr.data.latent_cache import LatentPairDataset
        from consissr.models.backbone import load_backbone
        from consissr.models.robust_clip import RobustCLIP
        from consissr.training.prompts import encode_prompts
        from consissr.training.sdsr_stage import LQ_PIXELS, SdsrDataset, robust_clip_embeddings

        self.budget, self.device = budget, torch.device(_device(budget))
        self.backbone_dir = backbone_dir
        self.bb = load_backbone("embedded", embedded_dir=backbone_dir)
        self.clip = RobustCLIP.from_pretrained(robust_clip_dir, device=self.device)
        self.clip.requires_grad_(False).eval()
        latents = LatentPairDataset(out / "data" / "latents")
        factor = 2 ** (len(self.bb.vae.config.block_out_channels) - 1)
        self.model_params = ModelParams(pos_embed_grid=budget.train_crop // factor)
        image_embeds = robust_clip_embeddings(self.clip, out / "data" / "degraded" / LQ_PIXELS, list(latents.ids),
                                              device=self.device)
        self.dataset = SdsrDataset(latents, image_embeds, torch.zeros(len(latents), dtype=torch.long))
        self.prompt_embeds = encode_prompts(self.bb.tokenizer, self.bb.text_encoder, [""], device=self.device)
        self.fingerprint = {"latents": file_sha256(out / "data" / "latents" / "manifest.json"),
                            "robust_clip": file_sha256(robust_clip_dir / "robust_clip.safetensors")}

    def fresh_unet(self, seed: int):
        """The UNet the base trains from scratch: the backbone's shape (or ``unet_channels``), seeded init."""
        from diffusers import UNet2DConditionModel

        config = dict(self.bb.unet.config)
        if self.budget.unet_channels:
            n = len(self.budget.unet_channels)
            config.update(block_out_channels=tuple(self.budget.unet_channels), attention_head_dim=(8,) * n,
                          down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                          up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1), layers_per_block=2)
        torch.manual_seed(seed)
        return UNet2DConditionModel.from_config(config)

    def net(self, seed: int, weights: Path | None = None):
        """A ConsisSR net on a fresh UNet; ``weights``: a full state dict saved by ``save_net``."""
        from safetensors.torch import load_file

        from consissr.models.consissr import ConsisSRNet

        torch.manual_seed(seed)
        net = ConsisSRNet.from_backbone(self.fresh_unet(seed), self.model_params, image_embed_dim=self.clip.embed_dim)
        if weights is not None:
            net.load_state_dict(load_file(weights))
        return net.to(self.device)

    def objective(self, net, *, tala: bool, gamma: float):
        from consissr.training.tala import TalaObjective

        return TalaObjective(net, alphas_cumprod=self.bb.noise_scheduler.alphas_cumprod,
                             prompt_embeds=self.prompt_embeds, gamma=gamma, tala=tala, prompt_dropout=0.0)

    def pipeline(self, net, gan=None):
        from consissr.inference.pipeline import ConsisSRPipeline

        bb = self.bb
        # the pipeline's defaults (colour fix adain, as the evaluate stage); Fig. 8's x̂0 is decoded raw
        pipe = ConsisSRPipeline(bb.vae, bb.text_encoder, bb.tokenizer, bb.noise_scheduler, net.eval(), self.clip, gan)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)


def save_net(net, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp))


def loop_settings(budget: Budget, *, steps: int, lr: float, seed: int, checkpoint_every: int, sample_every: int = 0):
    from consissr.training.loop import LoopSettings

    return LoopSettings(iterations=steps, lr=lr, global_batch_size=budget.batch, betas=(0.9, 0.99),
                        lr_warmup_steps=min(100, steps // 10), max_grad_norm=1.0, checkpoint_every=checkpoint_every,
                        keep_checkpoints=1, log_every=10, sample_every=sample_every, seed=seed,
                        device=_device(budget))


# --------------------------------------------------------------------------------------------
# sampling and scores
# --------------------------------------------------------------------------------------------
def sample_scores(pipe, crops: list[dict], *, seeds, steps: int, suite, x0_suite=None) -> list[dict]:
    """Full-mode sampling (§3.1) of every crop under every seed: final scores, and with ``x0_suite``
    PSNR/SSIM of the decoded x̂0 after every step (Fig. 8; paper t = diffusers index + 1)."""
    from consissr.evaluation.stage import to_uint8

    rows = []
    for seed in seeds:
        for crop in crops:
            hq, x0 = crop["hq"], []

            def record(p, i, t, kw, hq=hq, x0=x0):
                image = p.decode_latents(kw["pred_original_sample"])[0, :, :hq.shape[0], :hq.shape[1]]
                x0.append({"t": int(t) + 1, **x0_suite.score(to_uint8(image.permute(1, 2, 0).cpu().numpy()), hq)})
                return {}

            out = pipe(crop["lq"], mode="full", num_inference_steps=steps, seed=seed, output_type="np",
                       callback_on_step_end=record if x0_suite is not None else None)
            row = {"set": crop["set"], "id": crop["id"], "seed": seed, **suite.score(to_uint8(out.images[0]), hq)}
            if x0_suite is not None:
                row["x0"] = x0
            rows.append(row)
    return rows


def bicubic_scores(crops: list[dict], suite) -> list[dict]:
    from consissr.evaluation.stage import bicubic, to_uint8

    return [{"set": c["set"], "id": c["id"], **suite.score(to_uint8(bicubic(c["lq"], 4)), c["hq"])} for c in crops]


def mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------
def train_base(parts: Parts, state: RunState, out: Path, crops: list[dict], suite, run) -> dict:
    """Plain DDPM training of the whole net from scratch, evaluated every ``base_eval_every`` steps."""
    from consissr.training import loop
    from consissr.training.tala import tala_step

    budget = parts.budget
    seed = budget.train_seeds[0]
    entry = state.get("base") or {"done": False, "curve": [], "seconds": 0.0, "wall_seconds": 0.0}
    bicubic = mean(bicubic_scores(crops, suite), "psnr")
    entry["bicubic_psnr"] = bicubic
    net = parts.net(seed)
    net.requires_grad_(True)  # the base trains everything, UNet included (no pretrained prior here)
    objective = parts.objective(net, tala=False, gamma=budget.gamma)
    clock = time.monotonic if parts.device.type == "cuda" else time.process_time
    start, spent, wall0, wall_spent = clock(), entry["seconds"], time.monotonic(), entry["wall_seconds"]

    def evaluate(model, step):  # the loop's sample hook: eval mode, no grad, RNG forked
        rows = sample_scores(parts.pipeline(model.net), crops, seeds=budget.sample_seeds[:1],
                             steps=budget.sample_steps, suite=suite)
        point = {"step": step, "psnr": mean(rows, "psnr"), "ssim": mean(rows, "ssim"),
                 "seconds": spent + clock() - start, "wall_seconds": wall_spent + time.monotonic() - wall0}
        entry["curve"] = [p for p in entry["curve"] if p["step"] < step] + [point]
        entry["seconds"], entry["wall_seconds"] = point["seconds"], point["wall_seconds"]
        state.set("base", entry)
        run.log_metrics({"base/psnr": point["psnr"], "base/ssim": point["ssim"], "base/bicubic_psnr": bicubic}, step)
        log.info("base step %d: PSNR %.2f dB (bicubic %.2f), %.0f s", step, point["psnr"], bicubic, point["seconds"])
        if point["psnr"] > bicubic:
            raise BaseStop("beat_bicubic")
        if point["seconds"] > budget.base_max_seconds:
            raise BaseStop("time_budget")
        return {}

    settings = loop_settings(budget, steps=budget.base_max_steps, lr=budget.base_lr, seed=seed,
                             checkpoint_every=budget.base_eval_every, sample_every=budget.base_eval_every)
    try:
        result = loop.train(model=objective, loss_fn=tala_step, dataset=parts.dataset, settings=settings,
                            out_dir=out / "base", tracker=run, sample_fn=evaluate,
                            fingerprint={**parts.fingerprint, "phase": "base"})
        reason, step = "max_steps", result.step
        if not entry["curve"] or entry["curve"][-1]["step"] != step:
            try:
                evaluate(objective, step)
            except BaseStop as stop:
                reason = stop.args[0]
    except BaseStop as stop:
        reason, step = stop.args[0], entry["curve"][-1]["step"]
    save_net(net, out / "base" / "net.safetensors")
    last = entry["curve"][-1]
    entry.update(done=True, stop_reason=reason, steps=step, psnr=last["psnr"], beat_bicubic=last["psnr"] > bicubic)
    state.set("base", entry)
    return entry


def finetune(parts: Parts, state: RunState, out: Path, run, *, name: str, tala: bool, gamma: float, seed: int) -> None:
    """One arm: the base with the paper's trainable policy (§3.3), ``finetune_steps`` of Algorithm 1."""
    from consissr.models.consissr import apply_trainable_policy
    from consissr.training import loop
    from consissr.training.tala import tala_step

    budget = parts.budget
    net = parts.net(budget.train_seeds[0], out / "base" / "net.safetensors")
    apply_trainable_policy(net)
    objective = parts.objective(net, tala=tala, gamma=gamma)
    settings = loop_settings(budget, steps=budget.finetune_steps, lr=budget.finetune_lr, seed=seed,
                             checkpoint_every=max(1, budget.finetune_steps // 4))
    # the two arms differ only in ``tala`` (and γ): same base, data order, seed and steps
    fingerprint = {**parts.fingerprint, "phase": "finetune", "base": file_sha256(out / "base" / "net.safetensors"),
                   "tala": tala, "gamma": gamma}
    result = loop.train(model=objective, loss_fn=tala_step, dataset=parts.dataset, settings=settings,
                        out_dir=out / "finetune" / name, fingerprint=fingerprint)
    run.log_metrics({f"finetune/{name}/final_loss": float(np.mean(result.history["loss"][-20:]))}, result.step)
    save_net(net, out / "finetune" / name / "net.safetensors")
    state.set(f"finetune/{name}", {"done": True, "tala": tala, "gamma": gamma, "seed": seed, "steps": result.step,
                                   "loss_last20": float(np.mean(result.history["loss"][-20:]))})


def arm_name(tala: bool, gamma: float, seed: int) -> str:
    return f"tala-g{gamma:g}-s{seed}" if tala else f"ddpm-s{seed}"


def curves(per_model: dict[str, list[dict]], arms: dict[str, list[str]]) -> dict:
    """Fig. 8 JSON: per arm and timestep, mean and 95% interval of x̂0 PSNR/SSIM over training seeds ×
    crops × sampling seeds; and the paired difference TALA − DDPM (same seed, crop, sampling seed)."""
    from consissr.evaluation.report import summarise

    out: dict[str, Any] = {"arms": {}, "paired_difference": {}}
    for arm, models in arms.items():
        rows = [r for m in models for r in per_model[m]]
        ts = [p["t"] for p in rows[0]["x0"]]
        out["arms"][arm] = {"t": ts, **{k: [summarise([r["x0"][i][k] for r in rows]) for i in range(len(ts))]
                                        for k in ("psnr", "ssim")}}
    tala, ddpm = arms.get("tala"), arms.get("ddpm")
    if tala and ddpm:
        pairs = [(a, b) for ma, mb in zip(tala, ddpm) for a, b in zip(per_model[ma], per_model[mb])]
        ts = [p["t"] for p in pairs[0][0]["x0"]]
        out["paired_difference"] = {"t": ts, **{k: [summarise([a["x0"][i][k] - b["x0"][i][k] for a, b in pairs])
                                                    for i in range(len(ts))] for k in ("psnr", "ssim")}}
    return out


def plot_fig8(doc: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for ax, key, label in ((axes[0], "psnr", "PSNR of x̂0 (dB)"), (axes[1], "ssim", "SSIM of x̂0")):
        for arm, c in doc["arms"].items():
            m = np.array([s["mean"] for s in c[key]], dtype=float)
            h = np.array([s["ci95"] or 0.0 for s in c[key]], dtype=float)
            ax.plot(c["t"], m, label=arm)
            ax.fill_between(c["t"], m - h, m + h, alpha=0.25)
        ax.set_xlabel("t")
        ax.set_ylabel(label)
        ax.invert_xaxis()  # sampling runs from t = T down to 1
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def summary_row(rows: list[dict], metrics) -> dict:
    from consissr.evaluation.report import summarise

    return {m: summarise([r[m] for r in rows if m in r]) for m in metrics}


# --------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------
def run_fidelity(budget: Budget | str, out: str | Path, *, resume: bool = False,
                 backbone_dir: str | Path = "data/models/backbone",
                 robust_clip_dir: str | Path = "data/models/robust_clip", seed: int = 2024,
                 shared_data: str | Path = SHARED, stop_after: str | None = None) -> dict:
    """Run (or resume) every phase into ``out``; returns the state document. ``shared_data``: the folder
    with train/CBSD68 and test/Set5, test/Set14 (absent: the embedded photos). ``stop_after``: a phase
    name after which to return (tests; a killed run is the same thing)."""
    from consissr import tracking
    from consissr.evaluation.metrics import MetricSuite

    budget = BUDGETS[budget] if isinstance(budget, str) else budget
    _device(budget)  # the cuda budget fails here, before any work, on a machine without a GPU
    out, backbone_dir, robust_clip_dir = Path(out), Path(backbone_dir), Path(robust_clip_dir)
    for folder, stage in ((backbone_dir, "backbone"), (robust_clip_dir, "train_clip")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing; run `dvc repro {stage}` first")
    out.mkdir(parents=True, exist_ok=True)
    if budget.threads:
        torch.set_num_threads(budget.threads)
    state = RunState(out, budget, resume=resume)
    inputs = {"backbone": backbone_dir, "robust_clip": robust_clip_dir}
    with tracking.start_run("fidelity", params={"fidelity": budget, "base.seed": seed}, inputs=inputs,
                            tags={"budget": budget.name, "out": str(out)}) as run:
        _phases(budget, out, state, run, backbone_dir=backbone_dir, robust_clip_dir=robust_clip_dir, seed=seed,
                shared=Path(shared_data), stop_after=stop_after, suites=lambda names: MetricSuite(names, crop_border=4))
    return state.data


def _phases(budget: Budget, out: Path, state: RunState, run, *, backbone_dir: Path, robust_clip_dir: Path,
            seed: int, shared: Path, stop_after: str | None, suites) -> None:
    t0 = time.monotonic()

    def finish(phase: str) -> bool:
        log.info("fidelity: phase %s done (%.0f s in this invocation)", phase, time.monotonic() - t0)
        return stop_after == phase

    # 1. data
    if not state.done("data"):
        state.set("data", build_data(out, budget, backbone_dir=backbone_dir, seed=seed, shared=shared))
    if finish("data"):
        return
    check_frozen(state.get("data").get("frozen"), backbone_dir)
    parts = Parts(out, budget, backbone_dir=backbone_dir, robust_clip_dir=robust_clip_dir)
    crops = load_test_crops(out)
    suite, x0_suite = suites(["psnr", "ssim", budget.nr_metric]), suites(["psnr", "ssim"])

    # 2. the shared base
    base = state.done("base") or train_base(parts, state, out, crops, suite, run)
    if finish("base"):
        return
    if budget.require_base and not base["beat_bicubic"]:
        log.warning("fidelity: the base reached %.2f dB < bicubic %.2f dB in %d steps (%s); stopping here: "
                    "TALA vs DDPM means nothing on an untrained model", base["psnr"], base["bicubic_psnr"],
                    base["steps"], base["stop_reason"])
        return

    # 3. the two arms, same steps, ≥ 2 training seeds each
    arms = {"tala": [arm_name(True, budget.gamma, s) for s in budget.train_seeds],
            "ddpm": [arm_name(False, budget.gamma, s) for s in budget.train_seeds]}
    for s in budget.train_seeds:
        for tala in (True, False):
            name = arm_name(tala, budget.gamma, s)
            if not state.done(f"finetune/{name}"):
                finetune(parts, state, out, run, name=name, tala=tala, gamma=budget.gamma, seed=s)
    if finish("finetune"):
        return

    # 4. Fig. 8: x̂0 at every step of 50-step sampling, test crops × sampling seeds, per model
    per_model = {}
    for name in arms["tala"] + arms["ddpm"]:
        key = f"fig8/{name}"
        if not state.done(key):
            net = parts.net(0, out / "finetune" / name / "net.safetensors")
            rows = sample_scores(parts.pipeline(net), crops, seeds=budget.sample_seeds, steps=budget.sample_steps,
                                 suite=suite, x0_suite=x0_suite)
            write_json(out / "fig8" / f"{name}.json", rows)
            state.set(key, {"done": True, "samples": len(rows)})
        per_model[name] = json.loads((out / "fig8" / f"{name}.json").read_text())
    doc = curves(per_model, arms)
    doc.update(schema=SCHEMA, budget=budget.name, base=state.get("base"), train_seeds=list(budget.train_seeds),
               sample_seeds=list(budget.sample_seeds), crops=len(crops), steps=budget.sample_steps,
               finetune_steps=budget.finetune_steps)
    write_json(out / "fig8.json", doc)
    plot_fig8(doc, out / "fig8.png", f"Fig. 8 ({budget.name} budget): x̂0 vs t, TALA γ={budget.gamma:g} vs DDPM, "
                                     f"mean ± 95% CI")
    for i, t in enumerate(doc["paired_difference"].get("t", [])):
        run.log_metrics({"fig8/diff_psnr": doc["paired_difference"]["psnr"][i]["mean"]}, step=t)
    if not state.done("fig8"):
        state.set("fig8", {"done": True})
    if finish("fig8"):
        return

    # 5. Table 4: γ ∈ {5, 10, 20} beside DDPM (the extra γ: first training seed), final metrics
    metrics = ["psnr", "ssim", budget.nr_metric]
    table = {"ddpm": summary_row([r for m in arms["ddpm"] for r in per_model[m]], metrics),
             arm_name(True, budget.gamma, 0)[:-3]: summary_row([r for m in arms["tala"] for r in per_model[m]], metrics)}
    for gamma in budget.table4_gammas:
        name = arm_name(True, gamma, budget.train_seeds[0])
        if not state.done(f"finetune/{name}"):
            finetune(parts, state, out, run, name=name, tala=True, gamma=gamma, seed=budget.train_seeds[0])
        key = f"table4/{name}"
        if not state.done(key):
            net = parts.net(0, out / "finetune" / name / "net.safetensors")
            rows = sample_scores(parts.pipeline(net), crops, seeds=budget.sample_seeds, steps=budget.sample_steps,
                                 suite=suite)
            state.set(key, {"done": True, "rows": rows})
        table[arm_name(True, gamma, 0)[:-3]] = summary_row(state.get(key)["rows"], metrics)
    table["bicubic"] = summary_row(bicubic_scores(crops, suite), metrics)
    write_json(out / "table4.json", {"schema": SCHEMA, "budget": budget.name, "rows": table,
                                     "note": "extra γ rows: one training seed; DDPM and γ=10: all training seeds"})
    for row, stats in table.items():
        run.log_metrics({f"table4/{row}/{m}": s["mean"] for m, s in stats.items() if s["mean"] is not None}, step=0)
    if finish("table4"):
        return

    # 6. Fig. 10: GAN-Embedding t_max × steps with the TALA model (the evaluate stage's sweep)
    if not state.done("fig10"):
        _fig10(parts, out, crops, budget, seed, suite, run)
        state.set("fig10", {"done": True})
    finish("fig10")


def _fig10(parts: Parts, out: Path, crops: list[dict], budget: Budget, seed: int, suite, run) -> None:
    from consissr.evaluation.report import dataset_metrics, fig10_rows, write_fig10
    from consissr.evaluation.stage import Upscalers, fig10_sweep
    from consissr.models.gan import load_gan
    from consissr.training.gan_stage import train_gan

    data = out / "data"
    if not (out / "gan" / "gan_config.json").is_file():
        # Algorithm 2 starts from the pretrained Real-ESRGAN x4plus (the default GAN), as the paper's does
        train_gan(data / "prepared", data / "degraded", out / "gan", gan=GanParams(), train=TrainGanParams(iterations=0),
                  scale=4, seed=seed, device=_device(budget))
    net = parts.net(0, out / "finetune" / arm_name(True, budget.gamma, budget.train_seeds[0]) / "net.safetensors")
    pipe = parts.pipeline(net, load_gan(out / "gan", device=str(parts.device)))
    ev = EvaluateParams(sweep_t_max=budget.sweep_t_max, sweep_steps=budget.sweep_steps, lr_crop=budget.lr_crop,
                        metrics=("psnr", "ssim", budget.nr_metric), sweep_nr_metric=budget.nr_metric)
    upscale = Upscalers(lambda: pipe, scale=4)
    sweep = []
    for name in sorted({c["set"] for c in crops}):
        folder = data / "test" / name
        ids = [c["id"] for c in crops if c["set"] == name]
        sweep += fig10_sweep(name, folder, ids, ev, upscale, suite, seed)
    doc = dataset_metrics(dataset={"name": "+".join(sorted({c["set"] for c in crops})), "kind": "synthetic",
                                   "paper": None, "images": len(crops), "skipped": []},
                          metric_info={k: v.to_dict() for k, v in suite.info.items()}, per_image=[], settings={},
                          sweep=sweep)
    rows = fig10_rows(doc, budget.nr_metric)
    write_fig10(out / "fig10", rows, title=f"Fig. 10 ({budget.name} budget, TALA γ={budget.gamma:g} model)")
    write_json(out / "fig10" / "sweep.json", doc["sweep"])
    for r in rows:
        run.log_metrics({f"fig10/steps{r['steps']}/{k}": r[k] for k in ("psnr", "no_reference") if r[k] is not None},
                        step=r["t_max"])


__all__ = ["BUDGETS", "Budget", "RunState", "arm_name", "curves", "run_fidelity", "sample_scores"]
