"""``ConsisSRPipeline``: a low-quality image in, a 4× super-resolved one out (paper §3.1, Algorithm 2).

A diffusers ``DiffusionPipeline`` whose components are the frozen SD parts (``vae``,
``text_encoder``, ``tokenizer``, ``scheduler`` — a ``DDPMScheduler``), the trained ConsisSR net
(``net``: UNet + ControlNet + hybrid prompt adapter; ``unet``/``controlnet`` are its parts), the
robust CLIP student (``robust_clip``) and the GAN (``gan``, a realesrgan ``RealESRGANer``).
Modes: ``full`` (50 spaced DDPM steps from x_T ~ N(0, I)) and ``ganemb`` (Algorithm 2: start from
the GAN output's latent noised to t_max). Loading and saving are this class's own (docs/inference.md
says why diffusers' generic loader does not fit these parts).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image

from consissr.config import InferenceParams
from consissr.inference.color import color_fix_rows_
from consissr.inference.schedules import (
    FULL_STEPS,
    GANEMB_PRESETS,
    gan_start_latent,
    set_spaced_timesteps,
)
from consissr.inference.tiling import (
    check_tiles,
    gaussian_weights,
    size_multiple,
    tile_boxes,
    tiled_decode_into,
    tiled_encode,
    upscaled_window,
    vae_scale_factor,
)
from consissr.io import atomic_dir
from consissr.models.consissr import CONFIG_NAME as NET_CONFIG_NAME
from consissr.models.consissr import ConsisSRNet
from consissr.models.robust_clip import RobustCLIP

# default stage outputs that ``load_pipeline(None)`` assembles
STAGE_DIRS = {"backbone": Path("data/models/backbone"), "consissr": Path("data/models/consissr"),
              "robust_clip": Path("data/models/robust_clip"), "gan": Path("data/models/gan")}
BACKBONE_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
DEFAULT_SCALE = 4


@dataclass(frozen=True)
class SamplingPlan:
    """What one call runs, after defaults and presets are resolved."""

    mode: str
    t_max: int  # paper convention 1..T
    steps: int
    guidance_scale: float
    color_fix: str
    tile_size: int
    tile_overlap: int
    control_from_gan: bool


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _to_tensor(image: Any) -> torch.Tensor:
    """PIL RGB or float HxWx3 in [0, 1] (float keeps 16-bit precision) → (1, 3, H, W) float32."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB PIL image, got mode {image.mode} (convert it first)")
        array = np.asarray(image, dtype=np.float32) / 255.0
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] != 3 or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"expected a float HxWx3 array in [0, 1] or a PIL RGB image, got "
                             f"{array.dtype} {array.shape}")
        array = array.astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].clamp(0.0, 1.0)


class ConsisSRPipeline(DiffusionPipeline):
    """ConsisSR inference (paper §3.1 and Algorithm 2) in diffusers' pipeline form.

    Args:
        vae, text_encoder, tokenizer, scheduler: the frozen SD parts (``scheduler`` a ``DDPMScheduler``
            with the model's own training schedule).
        net: the trained ``ConsisSRNet`` (holds the UNet and the ControlNet).
        robust_clip: the robust CLIP (``RobustCLIP``, student tower) giving the image prompt.
        gan: a realesrgan ``RealESRGANer`` (GAN-Embedding and ``gan_upscale``), or ``None``.
        defaults: ``InferenceParams`` fields (sampling defaults of ``__call__``).
        training_info: ``consissr_config.json``'s ``"training"`` entry, or ``{}``.
    """

    def __init__(self, vae, text_encoder, tokenizer, scheduler, net: ConsisSRNet, robust_clip: RobustCLIP, gan,
                 defaults: dict | None = None, training_info: dict | None = None) -> None:
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                              net=net, robust_clip=robust_clip, gan=gan)
        defaults = dataclasses.asdict(InferenceParams(**(defaults or {})))
        self.register_to_config(defaults=defaults, training_info=dict(training_info or {}))

    # ----------------------------------------------------------------------------------------
    # parts
    # ----------------------------------------------------------------------------------------
    @property
    def unet(self):
        return self.net.unet

    @property
    def controlnet(self):
        return self.net.controlnet

    @property
    def scale(self) -> int:
        return int(getattr(self.gan, "scale", DEFAULT_SCALE)) if self.gan is not None else DEFAULT_SCALE

    @property
    def training_info(self) -> dict:
        return dict(self.config.training_info or {})

    @property
    def defaults(self) -> InferenceParams:
        return InferenceParams(**self.config.defaults)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ConsisSRPipeline:
        """Move the torch parts and the GAN's network (diffusers' ``to`` reads ``.dtype``/``.device``
        attributes that ``ConsisSRNet``, ``RobustCLIP`` and ``RealESRGANer`` do not have)."""
        device = resolve_device(device) if device is not None else None
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.vae, self.text_encoder, self.net, self.robust_clip):
            module.to(**moves)
        if self.gan is not None and device is not None:
            self.gan.model.to(device)
            self.gan.device = device
        return self

    # ----------------------------------------------------------------------------------------
    # loading and saving
    # ----------------------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, *, backbone: str | Path, consissr: str | Path, robust_clip: str | Path,
                   gan: str | Path | None, device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None,
                   defaults: InferenceParams | dict | None = None,
                   training_info: dict | None = None) -> ConsisSRPipeline:
        """Assemble from stage-output folders (``backbone`` may be SD-layout or hold ``source.json``).

        ``training_info`` defaults to the ``"training"`` entry of the ``consissr`` folder's ``consissr_config.json``.
        """
        from consissr.models.backbone import load_backbone

        device = resolve_device(device)
        source, revision = _backbone_source(Path(backbone))
        bb = load_backbone(source, revision=revision, torch_dtype=torch_dtype)
        net = ConsisSRNet.from_pretrained(consissr, bb.unet).eval()
        clip = RobustCLIP.from_pretrained(robust_clip, device="cpu").eval()
        gan_model = None
        if gan is not None and (Path(gan) / "gan_config.json").is_file():
            from consissr.models.gan import load_gan

            gan_model = load_gan(gan, device="cpu")
        if training_info is None:
            training_info = json.loads((Path(consissr) / NET_CONFIG_NAME).read_text()).get("training", {})
        if isinstance(defaults, InferenceParams):
            defaults = dataclasses.asdict(defaults)
        pipe = cls(bb.vae, bb.text_encoder, bb.tokenizer, bb.noise_scheduler, net, clip, gan_model,
                   defaults=defaults, training_info=training_info)
        return pipe.to(device)

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str | torch.device = "cpu",
                        torch_dtype: torch.dtype | None = None, **_: Any) -> ConsisSRPipeline:
        """Load what ``save_pretrained`` wrote: SD-layout parts, ``consissr/``, ``robust_clip/``, ``gan/``."""
        folder = Path(folder)
        index = folder / cls.config_name
        if not index.is_file():
            raise FileNotFoundError(f"{index}: missing; not a saved ConsisSRPipeline folder")
        config = json.loads(index.read_text())
        if config.get("_class_name") != cls.__name__:
            raise ValueError(f"{index}: a {config.get('_class_name')!r}, not a {cls.__name__}")
        return cls.from_parts(backbone=folder, consissr=folder / "consissr", robust_clip=folder / "robust_clip",
                              gan=folder / "gan", device=device, torch_dtype=torch_dtype,
                              defaults=config.get("defaults"), training_info=config.get("training_info"))

    def save_pretrained(self, folder: str | Path, **_: Any) -> Path:
        """Write every part in its own library's format (SD layout + ``consissr/`` + ``robust_clip/`` + ``gan/``).

        The folder is built beside the target and swapped in whole.
        """
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            for name in BACKBONE_PARTS:  # processors of the net are plain objects: the UNet saves as vanilla SD
                getattr(self, name).save_pretrained(tmp / name)
            self.net.save_pretrained(tmp / "consissr")
            self.robust_clip.save_pretrained(tmp / "robust_clip")
            if self.gan is not None:
                from consissr.models.gan import save_gan

                save_gan(self.gan.model, tmp / "gan", **_gan_arch(self.gan), provenance=getattr(self.gan, "provenance", {}))
            self.save_config(tmp)  # model_index.json: components, defaults, training info
        return folder

    # ----------------------------------------------------------------------------------------
    # building blocks
    # ----------------------------------------------------------------------------------------
    def gan_upscale(self, image: np.ndarray, *, tile: int | None = None) -> np.ndarray:
        """The GAN alone: float HxWx3 in [0, 1] → float32 (sH)x(sW)x3 (Algorithm 2, l. 1).

        ``tile``: RealESRGANer's tile size in input pixels for this call (0: whole image; ``None``:
        the tiling that ``tile_size`` gives an image this large).
        """
        if self.gan is None:
            raise RuntimeError("this pipeline has no GAN (data/models/gan missing?): run `dvc repro train_gan`")
        from consissr.models.gan import gan_upscale, tile_for

        if tile is None:
            tile = tile_for(image.shape, self.scale, self.defaults.tile_size)
        saved, self.gan.tile_size = self.gan.tile_size, tile
        memo = getattr(self, "gan_memo", None)  # a GanMemo: evaluate sets one (its methods share the GAN output)
        precision = self.defaults.gan_precision
        try:
            return (memo(self.gan, image, precision=precision) if memo is not None
                    else gan_upscale(self.gan, image, precision=precision))
        finally:
            self.gan.tile_size = saved

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance: bool) -> torch.Tensor:
        """Text embeddings (1, L, C), or (2, L, C) = [negative, positive] for classifier-free guidance."""
        texts = [negative_prompt, prompt] if guidance else [prompt]
        tokens = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(self.text_encoder.device))[0].to(self.unet.dtype)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [0, 1] → scaled latent ``mode() × scaling_factor`` (as the latent cache)."""
        latent = self.vae.encode((image * 2 - 1).to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        return latent * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((image.float() + 1) / 2).clamp(0.0, 1.0)

    def _noise_prediction(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, cond: torch.Tensor,
                          image_embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """ε̂ with classifier-free guidance over the text prompt (image prompt and LQ in both halves)."""
        n = text.shape[0]
        eps = self.net(x.repeat(n, 1, 1, 1), t, text, cond.repeat(n, 1, 1, 1), image_embeds.repeat(n, 1))
        if n == 1:
            return eps
        eps_negative, eps_positive = eps.chunk(2)
        return eps_negative + guidance_scale * (eps_positive - eps_negative)

    def _tiled_noise_prediction(self, x, t, text, cond, image_embeds, guidance_scale, boxes) -> torch.Tensor:
        """Gaussian-weighted blend of the per-tile ε̂ (one window at a time: memory per tile, not per image)."""
        if len(boxes) == 1:
            return self._noise_prediction(x, t, text, cond, image_embeds, guidance_scale)
        total = torch.zeros_like(x, dtype=torch.float32)
        weight_sum = torch.zeros((1, 1, *x.shape[-2:]), dtype=torch.float32, device=x.device)
        for y0, y1, x0, x1 in boxes:
            eps = self._noise_prediction(x[..., y0:y1, x0:x1], t, text, cond[..., y0:y1, x0:x1], image_embeds,
                                         guidance_scale)
            weight = gaussian_weights(y1 - y0, x1 - x0, device=x.device)
            total[..., y0:y1, x0:x1] += eps.float() * weight
            weight_sum[..., y0:y1, x0:x1] += weight
        return (total / weight_sum).to(x.dtype)

    def plan(self, *, mode=None, preset=None, t_max=None, num_inference_steps=None, guidance_scale=None,
             color_fix=None, tile_size=None, tile_overlap=None, control_from_gan=None) -> SamplingPlan:
        """Resolve a call's knobs against the defaults (``InferenceParams``) and the Table 2 presets."""
        d = self.defaults
        T = self.scheduler.config.num_train_timesteps
        mode = mode or d.mode
        if mode == "full":
            if preset is not None:
                raise ValueError("presets (rec, gen) belong to mode='ganemb'")
            if t_max not in (None, T):
                raise ValueError(f"mode='full' starts from pure noise at t = T = {T}; t_max={t_max} needs mode='ganemb'")
            t_max, steps = T, num_inference_steps or d.num_inference_steps or FULL_STEPS
        elif mode == "gan":  # the GAN alone (Algorithm 2, l. 1): Real-ESRGAN's output, no diffusion
            if preset is not None or t_max is not None or num_inference_steps is not None:
                raise ValueError("mode='gan' runs the GAN alone: presets, t_max and steps belong to the diffusion modes")
            t_max, steps = 0, 0
        elif mode == "ganemb":
            preset = preset or d.preset
            if preset not in GANEMB_PRESETS:
                raise ValueError(f"preset must be one of {sorted(GANEMB_PRESETS)}, got {preset!r}")
            preset_t_max, preset_steps = GANEMB_PRESETS[preset]
            t_max, steps = t_max or preset_t_max, num_inference_steps or preset_steps
        else:
            raise ValueError(f"mode must be 'full', 'ganemb' or 'gan', got {mode!r}")
        plan = SamplingPlan(
            mode=mode, t_max=int(t_max), steps=int(steps),
            guidance_scale=float(d.guidance_scale if guidance_scale is None else guidance_scale),
            color_fix=color_fix or d.color_fix, tile_size=int(tile_size or d.tile_size),
            tile_overlap=int(d.tile_overlap if tile_overlap is None else tile_overlap),
            control_from_gan=bool(d.control_from_gan if control_from_gan is None else control_from_gan))
        check_tiles(plan.tile_size, plan.tile_overlap, size_multiple(self.vae, self.unet))
        return plan

    # ----------------------------------------------------------------------------------------
    # the call
    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image,
        *,
        mode: str | None = None,
        preset: str | None = None,
        t_max: int | None = None,
        num_inference_steps: int | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        guidance_scale: float | None = None,
        hpa_scale: float | None = None,
        color_fix: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        control_from_gan: bool | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        return_dict: bool = True,
    ):
        """Super-resolve ``image`` (PIL RGB, float HxWx3 in [0, 1], or a list of them) by ``self.scale``.

        Args:
            mode: ``"full"`` (§3.1: x_T ~ N(0, I), ``num_inference_steps`` spaced DDPM steps, 50 by
                default), ``"ganemb"`` (Algorithm 2) or ``"gan"`` (the GAN alone, Real-ESRGAN's output).
                ``None``: the pipeline's default.
            preset: GANEmb preset of Table 2, ``"rec"`` (t_max 600, 10 steps) or ``"gen"`` (1000, 10).
            t_max, num_inference_steps: override the preset (t_max in the paper's 1..T).
            prompt, negative_prompt, guidance_scale: text prompt and classifier-free guidance
                (scale 1 = off, one forward per step).
            hpa_scale: weight of the hybrid prompt adapter's image branch for this call.
            color_fix: ``"adain"`` | ``"wavelet"`` | ``"none"`` against the bicubic-upsampled input.
            seed / generator: the random source (a CPU generator; the same seed gives the same image).
            tile_size, tile_overlap: output pixels; larger images run tiled (latent diffusion, VAE, GAN).
            control_from_gan: GANEmb only: ControlNet and robust CLIP see the GAN output.
            output_type: ``"pil"`` (RGB images) or ``"np"`` (float32 N×H×W×3 in [0, 1]).
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ..., "pred_original_sample": x̂0})
                -> dict`` (diffusers' convention; a returned ``"latents"`` replaces the current ones).
        """
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        plan = self.plan(mode=mode, preset=preset, t_max=t_max, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, color_fix=color_fix, tile_size=tile_size,
                         tile_overlap=tile_overlap, control_from_gan=control_from_gan)
        d = self.defaults
        guided = plan.guidance_scale != 1.0
        text = self.encode_prompt(d.prompt if prompt is None else prompt,
                                  d.negative_prompt if negative_prompt is None else negative_prompt, guided)
        if generator is None:
            generator = torch.Generator("cpu")
            if seed is not None:
                generator.manual_seed(int(seed))
            else:
                generator.seed()
        images = image if isinstance(image, (list, tuple)) else [image]
        saved_hpa = self.net.hpa_scale
        if hpa_scale is not None:
            self.net.hpa_scale = hpa_scale
        try:
            outputs = [self._upscale(_to_tensor(img), plan, text, generator, callback_on_step_end) for img in images]
        finally:
            self.net.hpa_scale = saved_hpa
        if output_type == "pil":  # in place: no second float image
            result = [Image.fromarray(np.round(np.multiply(a, 255, out=a), out=a).astype(np.uint8)) for a in outputs]
        elif len(outputs) == 1:
            result = outputs[0][None]  # a view: no copy of the image
        elif len({a.shape for a in outputs}) == 1:
            result = np.stack(outputs)
        else:
            result = outputs  # different sizes cannot stack
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=result) if return_dict else (result,)

    def _upscale(self, lq: torch.Tensor, plan: SamplingPlan, text: torch.Tensor, generator: torch.Generator,
                 callback: Callable | None) -> np.ndarray:
        """One image: (1, 3, h, w) → (s·h, s·w, 3) float32 in [0, 1].

        Memory: besides the input and the returned image, only latent-sized
        tensors (the latents, the LQ condition, one ε̂ blend: each 8/(3·16) of the float32 output
        with the embedded 4×, 8-channel VAE; 4/(3·64) with SD's) and tile-sized ones. The 4×
        pixels that the VAE encoder, the robust CLIP and the colour fix read (bicubic LQ, GAN
        output) are made window by window from the LQ, and the VAE decodes into the output.
        """
        if plan.mode == "gan":  # this call's tile size; gan_upscale names a missing GAN
            from consissr.models.gan import tile_for

            image = lq[0].permute(1, 2, 0).numpy()
            return self.gan_upscale(image, tile=tile_for(image.shape, self.scale, plan.tile_size))
        device, dtype = self.unet.device, self.unet.dtype
        s = self.scale
        h, w = lq.shape[-2:]
        out_h, out_w = s * h, s * w
        multiple, factor = size_multiple(self.vae, self.unet), vae_scale_factor(self.vae)
        pad_h, pad_w = out_h + -out_h % multiple, out_w + -out_w % multiple
        tiled = max(out_h, out_w) > plan.tile_size
        vae_tile, vae_overlap = (plan.tile_size, plan.tile_overlap) if tiled else (max(pad_h, pad_w), 0)
        strip = max(1, plan.tile_size ** 2 // out_w)  # rows of a full-width strip: about one tile of pixels

        # 1. Algorithm 2, l. 1: the 4× pixels, as windows on demand (rows past the image: the padding)
        def bicubic(box):
            return upscaled_window(lq, s, box, 2, lambda crop: _bicubic_up(crop, s))  # 2 LQ pixels: bicubic's reach

        def gan(box):
            return upscaled_window(lq, s, box, self.gan.tile_pad, lambda crop: self._gan_window(crop, plan, tiled))

        if plan.mode == "ganemb" and self.gan is None:
            raise RuntimeError("this pipeline has no GAN (data/models/gan missing?): run `dvc repro train_gan`")
        control = gan if (plan.control_from_gan and plan.mode == "ganemb") else bicubic

        # 2. conditions: robust CLIP image prompt (whole image) and the ControlNet's LQ latent,
        #    both from the same picture, padded to the VAE × UNet multiple
        image_embeds = self.robust_clip.student_embeds_rows(lambda r0, r1: control((r0, r1, 0, out_w)), out_h, out_w,
                                                            strip).to(device, dtype)
        cond = tiled_encode(self.encode_image, control, pad_h, pad_w, vae_tile, vae_overlap, factor).to(dtype)
        z_gan = None
        if plan.mode == "ganemb":
            z_gan = cond if control is gan else tiled_encode(self.encode_image, gan, pad_h, pad_w, vae_tile,
                                                             vae_overlap, factor).to(dtype)

        # 3. the start: x_T ~ N(0, I) (full), or the GAN latent noised to t_max (Algorithm 2, l. 2–3)
        timesteps = set_spaced_timesteps(self.scheduler, plan.steps, plan.t_max)  # on the CPU: they index ᾱ
        noise = torch.randn(cond.shape, generator=generator, dtype=torch.float32).to(device, dtype)
        latents = noise if plan.mode == "full" else gan_start_latent(self.scheduler, z_gan, noise, plan.t_max)
        del noise, z_gan

        # 4. the spaced reverse chain (DDPMScheduler on the respaced betas), tiled above tile_size
        boxes = tile_boxes(*latents.shape[-2:], plan.tile_size // factor, plan.tile_overlap // factor)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                eps = self._tiled_noise_prediction(latents, t, text, cond, image_embeds, plan.guidance_scale, boxes)
                step = self.scheduler.step(eps, t, latents, generator=generator)
                latents = step.prev_sample
                del eps
                if callback is not None:  # x̂0 of this step too (Fig. 8 decodes it)
                    result = callback(self, i, t, {"latents": latents,
                                                   "pred_original_sample": step.pred_original_sample}) or {}
                    latents = result.get("latents", latents)
                del step
                progress.update()
        del cond

        # 5. decode into the output (the padding dropped), colour-correct it in place against the
        #    bicubic-upsampled LQ
        image = torch.zeros((out_h, out_w, 3), dtype=torch.float32)
        tiled_decode_into(image, self.decode_latents, latents, vae_tile // factor, vae_overlap // factor, factor)
        del latents
        color_fix_rows_(image, lambda r0, r1: bicubic((r0, r1, 0, out_w)), plan.color_fix, strip)
        return image.numpy()

    def _gan_window(self, crop: torch.Tensor, plan: SamplingPlan, tiled: bool) -> torch.Tensor:
        """The GAN on an LQ crop (1, 3, h, w) → (1, 3, s·h, s·w); RealESRGANer's own tiling above a tile
        (a full-width strip for the robust CLIP when it sees the GAN output)."""
        s, tile = self.scale, plan.tile_size // self.scale
        out = self.gan_upscale(crop[0].permute(1, 2, 0).numpy(),
                               tile=tile if tiled and max(crop.shape[-2:]) > tile + 2 * self.gan.tile_pad else 0)
        if out.shape[:2] != (s * crop.shape[-2], s * crop.shape[-1]):
            raise RuntimeError(f"the GAN gave {out.shape[:2]} for a {tuple(crop.shape[-2:])} crop, expected ×{s}")
        return torch.from_numpy(out).permute(2, 0, 1)[None]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _bicubic_up(crop: torch.Tensor, scale: int) -> torch.Tensor:
    """(1, 3, h, w) → (1, 3, s·h, s·w) bicubic in [0, 1] (the colour fix's and the ControlNet's LQ)."""
    return F.interpolate(crop, size=(scale * crop.shape[-2], scale * crop.shape[-1]), mode="bicubic",
                         align_corners=False).clamp(0.0, 1.0)


def _backbone_source(folder: Path) -> tuple[str, str | None]:
    """A backbone folder in SD layout, or the ``source.json`` that names the real one."""
    if (folder / "unet" / "config.json").is_file():
        return str(folder), None
    pointer = folder / "source.json"
    if pointer.is_file():
        data = json.loads(pointer.read_text())
        return data["pretrained"], data.get("revision")
    raise FileNotFoundError(f"{folder}: neither an SD-layout backbone nor a source.json; run `dvc repro backbone`")


def _gan_arch(upsampler) -> dict[str, int]:
    """RRDBNet's construction arguments, read off the network (what ``save_gan`` records)."""
    model = upsampler.model
    return {"scale": int(upsampler.scale), "num_block": len(model.body), "num_feat": model.conv_first.out_channels,
            "num_grow_ch": model.body[0].rdb1.conv1.out_channels}


def load_pipeline(model_dir: str | Path | None = None, *, device: str | torch.device = "auto",
                  torch_dtype: torch.dtype | None = None, defaults: InferenceParams | None = None,
                  stage_dirs: dict[str, Path] | None = None) -> ConsisSRPipeline:
    """A saved pipeline folder, or (``None``) the default stage outputs under data/models/."""
    if model_dir is not None:
        pipe = ConsisSRPipeline.from_pretrained(model_dir, device=device, torch_dtype=torch_dtype)
        if defaults is not None:
            pipe.register_to_config(defaults=dataclasses.asdict(defaults))
        return pipe
    dirs = {**STAGE_DIRS, **(stage_dirs or {})}
    for name in ("backbone", "consissr", "robust_clip"):
        if not Path(dirs[name]).is_dir():
            raise FileNotFoundError(f"{dirs[name]}: missing; run `dvc repro` (stage outputs {name})")
    return ConsisSRPipeline.from_parts(backbone=dirs["backbone"], consissr=dirs["consissr"],
                                       robust_clip=dirs["robust_clip"], gan=dirs["gan"], device=device,
                                       torch_dtype=torch_dtype, defaults=defaults)


__all__ = ["ConsisSRPipeline", "SamplingPlan", "load_pipeline"]
