"""ConsisSRPipeline (consissr/inference/): schedules against IDDPM's formulas, GANEmb start, seeds,
odd sizes, tiling, colour fix, guidance, save/load. Tiny models built by the stages' own code."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from consissr.config import InferenceParams, ModelParams
from consissr.inference.color import adain_color_fix, color_fix, color_fix_rows_, wavelet_color_fix
from consissr.inference.schedules import (
    gan_start_latent,
    set_spaced_timesteps,
    spaced_timesteps,
)
from consissr.inference.tiling import (
    blend_weights,
    gaussian_weights,
    pad_to_multiple,
    tile_boxes,
    tile_starts,
    tiled_decode_into,
    tiled_encode,
    upscaled_window,
)

SEED = 7


# --------------------------------------------------------------------------------------------
# reference formulas, written from the papers (not from the code under test)
# --------------------------------------------------------------------------------------------
def iddpm_space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """IDDPM respace.py ``space_timesteps(num_timesteps, str(count))`` for one section."""
    frac_stride = (num_timesteps - 1) / (count - 1)
    cur, steps = 0.0, []
    for _ in range(count):
        steps.append(round(cur))
        cur += frac_stride
    return steps


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's "scaled_linear" schedule: β_t = (linspace(√0.00085, √0.012, 1000))², ᾱ_t = Π(1 − β)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.fixture(scope="module")
def scheduler(tiny_backbone):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(tiny_backbone, subfolder="scheduler")


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------
def test_full_mode_timesteps_are_iddpm_respaced(scheduler):
    timesteps = set_spaced_timesteps(scheduler, 50, 1000).tolist()
    assert timesteps == iddpm_space_timesteps(1000, 50)[::-1]
    assert timesteps == [round(i * 999 / 49) for i in range(50)][::-1]
    assert timesteps[0] == 999 and timesteps[-1] == 0
    # diffusers' default "leading" spacing is another list (981 … 1): why custom timesteps are set
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist()[0] == 981 and scheduler.timesteps.tolist() != timesteps


def test_scheduler_step_uses_the_respaced_betas(scheduler):
    """One DDPMScheduler step equals IDDPM's respaced posterior: β' = 1 − ᾱ_t/ᾱ_prev of the list."""
    ab = sd_alphas_cumprod()
    assert torch.allclose(scheduler.alphas_cumprod.double(), ab, rtol=1e-5)
    timesteps = set_spaced_timesteps(scheduler, 10, 600).tolist()
    assert timesteps[0] == 599  # paper t_max = 600 is diffusers index 599
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        a_t, a_prev = ab[t], (ab[prev] if prev is not None else torch.tensor(1.0, dtype=torch.float64))
        beta = 1 - a_t / a_prev  # respaced β'
        x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
        mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x.double()
        variance = beta * (1 - a_prev) / (1 - a_t)  # posterior variance of the respaced chain
        out = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(10 + i)).prev_sample
        if prev is None:  # last step: no noise
            expected = mean
        else:
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + i))
            expected = mean + variance.sqrt() * noise.double()
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_spaced_timesteps_start_at_t_max_in_paper_convention():
    assert spaced_timesteps(10, 1000)[0] == 999  # t_max = T = 1000 → index 999
    assert spaced_timesteps(10, 600) == [round(i * 599 / 9) for i in range(10)][::-1]
    assert spaced_timesteps(1, 600) == [599]
    with pytest.raises(ValueError, match="t_max"):
        spaced_timesteps(10, 1001)
    with pytest.raises(ValueError, match="steps"):
        spaced_timesteps(0, 600)


def test_gan_start_latent_formula(scheduler):
    z = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(2))
    eps = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(3))
    ab = sd_alphas_cumprod()[599]
    expected = ab.sqrt() * z.double() + (1 - ab).sqrt() * eps.double()
    torch.testing.assert_close(gan_start_latent(scheduler, z, eps, 600).double(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# colour fix and tiles
# --------------------------------------------------------------------------------------------
def test_adain_matches_reference_statistics():
    g = torch.Generator().manual_seed(0)
    image, ref = torch.rand(1, 3, 20, 24, generator=g), torch.rand(1, 3, 20, 24, generator=g) * 0.5 + 0.2
    out = adain_color_fix(image, ref)
    torch.testing.assert_close(out.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.flatten(2).std(dim=2), ref.flatten(2).std(dim=2), rtol=1e-3, atol=1e-4)


def test_wavelet_keeps_detail_and_takes_the_reference_colour():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 40, 40, generator=g) * 0.5
    shifted = ref + torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)  # same detail, other colour
    torch.testing.assert_close(wavelet_color_fix(shifted, ref), ref, rtol=0, atol=1e-5)
    assert torch.equal(color_fix(shifted, ref, "none"), shifted.clamp(0, 1))
    with pytest.raises(ValueError, match="color_fix"):
        color_fix(shifted, ref, "histogram")


def test_tiles_cover_the_grid_with_positive_weights():
    boxes = tile_boxes(40, 25, 16, 8)
    cover = torch.zeros(40, 25)
    for y0, y1, x0, x1 in boxes:
        assert (y1 - y0, x1 - x0) == (16, 16)
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    assert tile_boxes(10, 12, 16, 8) == [(0, 10, 0, 12)]
    w = gaussian_weights(16, 16)
    assert w.min() > 0 and w[0, 0, 7:9, 7:9].min() == w.max()


# --------------------------------------------------------------------------------------------
# streamed tiling: windows, VAE tiles, colour fix and CLIP in strips; allocations stay tile-sized
# --------------------------------------------------------------------------------------------
class FreshAllocations(TorchDispatchMode):
    """Bytes of every new tensor storage made while active (views and in-place results excluded).

    tracemalloc does not see torch's CPU allocations, so the log comes from torch's dispatcher.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.sizes += [t.untyped_storage().nbytes() for t in tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen]
        return out


def test_blend_weights_sum_to_one_and_ramp_over_the_overlap():
    starts = tile_starts(100, 32, 12)  # the last window flush with the end: a wider last overlap
    weights = blend_weights(starts, 32, 100, 12)
    total = torch.zeros(100)
    for s, w in zip(starts, weights):
        total[s:s + 32] += w
    torch.testing.assert_close(total, torch.ones(100), rtol=0, atol=1e-6)
    middle = weights[1]
    assert middle[12:20].eq(1).all() and (middle[:12].diff() > 0).all() and (middle[-12:].diff() < 0).all()
    assert blend_weights([0], 32, 20, 12)[0].eq(1).all()  # one window: weight 1, the ramps cancel


def test_upscaled_window_is_the_crop_of_the_whole_upscale():
    lq = torch.rand(1, 3, 13, 17, generator=torch.Generator().manual_seed(0))

    def up(x):
        return F.interpolate(x, size=(4 * x.shape[-2], 4 * x.shape[-1]), mode="bicubic", align_corners=False)

    whole = pad_to_multiple(up(lq), 8)  # 56 × 72: the rows and columns past 52 × 68 are padding
    for box in [(0, 56, 0, 72), (8, 24, 16, 48), (20, 56, 36, 72), (52, 56, 0, 8)]:
        assert torch.equal(upscaled_window(lq, 4, box, 2, up), whole[..., box[0]:box[1], box[2]:box[3]]), box


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                         layers_per_block=1).eval()


def test_tiled_encode_and_decode_blend_exactly_and_allocate_per_tile(tiny_vae):
    """A tiling-invariant stand-in for the VAE (pooling / nearest upsampling) gives the whole-image
    result, so the blend weights sum to 1 and the padding is dropped; with the real tiny VAE the
    largest new tensor is the same for a 4× larger image and smaller than one channel of it (the
    old path, diffusers' tiled decode, concatenated the tiles into new image-sized tensors)."""
    z = torch.rand(1, 4, 20, 28, generator=torch.Generator().manual_seed(1))
    out = tiled_decode_into(torch.zeros(38, 54, 3), lambda t: t[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2),
                            z, 8, 4, 2)
    torch.testing.assert_close(out, z[0, :3].repeat_interleave(2, -1).repeat_interleave(2, -2)[:, :38, :54]
                               .permute(1, 2, 0), rtol=0, atol=1e-6)
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    latent = tiled_encode(lambda x: F.avg_pool2d(x, 2), lambda b: image[..., b[0]:b[1], b[2]:b[3]], 40, 56, 16, 8, 2)
    torch.testing.assert_close(latent, F.avg_pool2d(image, 2), rtol=0, atol=1e-6)

    def decode(t):
        return ((tiny_vae.decode(t).sample + 1) / 2).clamp(0, 1)

    peaks, images = [], []
    for side in (12, 24):  # latent side; 24 → 48 output pixels
        log, out, latents = FreshAllocations(), torch.zeros(2 * side, 2 * side, 3), torch.randn(1, 4, side, side)
        with torch.no_grad(), log:
            tiled_decode_into(out, decode, latents, 8, 4, 2)
        peaks.append(max(log.sizes))
        images.append(out)
    assert peaks[0] == peaks[1] < images[1].nbytes / 3, (peaks, images[1].nbytes)  # < one channel of the image
    assert 0 <= images[1].min() and images[1].max() <= 1 + 1e-6  # a convex blend of tiles in [0, 1]
    z16 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    single = tiled_decode_into(torch.zeros(32, 32, 3), decode, z16, 16, 0, 2)
    assert torch.equal(single, decode(z16)[0].permute(1, 2, 0))  # one tile: the plain decode


@pytest.mark.parametrize("method", ["adain", "wavelet", "none"])
def test_color_fix_in_strips_equals_the_whole_image(method):
    g = torch.Generator().manual_seed(0)
    image, ref = torch.rand(1, 3, 150, 40, generator=g), torch.rand(1, 3, 150, 40, generator=g) * 0.5 + 0.2
    whole = color_fix(image, ref, method)[0].permute(1, 2, 0)
    for strip in (1, 20, 45, 200):
        fixed = image[0].permute(1, 2, 0).contiguous()
        color_fix_rows_(fixed, lambda r0, r1: ref[..., r0:r1, :], method, strip)
        torch.testing.assert_close(fixed, whole, rtol=0, atol=1e-6)
    peaks = []
    for height in (150, 600):  # allocations per strip: the same for a 4× taller image
        log, tall = FreshAllocations(), torch.rand(height, 40, 3)
        with log:
            color_fix_rows_(tall, lambda r0, r1: torch.rand(1, 3, r1 - r0, 40), method, 20)
        peaks.append(max(log.sizes, default=0))
    assert peaks[0] == peaks[1] < 600 * 40 * 3 * 4 / 2  # under half the taller image


def test_robust_clip_preprocess_in_strips_equals_the_whole_image():
    from consissr.models.robust_clip import RobustCLIP

    clip = RobustCLIP(model_name="consissr-tiny-vit", with_teacher=False)
    for h, w in ((300, 260), (250, 410), (230, 230)):
        image = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        strips = clip.preprocess_rows(lambda r0, r1, image=image: image[..., r0:r1, :], h, w, 37)
        assert torch.equal(strips, clip.preprocess(image)), (h, w)


# --------------------------------------------------------------------------------------------
# the pipeline on tiny parts
# --------------------------------------------------------------------------------------------
def _perturb_(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Random values in the zero-initialised additions, so that loading them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def parts(tiny_backbone, tmp_path_factory):
    """Stage-like folders: backbone (conftest), consissr net, robust CLIP, a tiny random GAN."""
    from consissr.models.backbone import load_backbone
    from consissr.models.consissr import ConsisSRNet
    from consissr.models.robust_clip import RobustCLIP

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    clip = RobustCLIP(model_name="consissr-tiny-vit", with_teacher=False)
    clip.save_pretrained(root / "robust_clip")
    unet = load_backbone("embedded", embedded_dir=tiny_backbone).unet
    net = ConsisSRNet.from_backbone(unet, ModelParams(), image_embed_dim=clip.embed_dim)
    for module in (net.hpa_unet, net.hpa_controlnet, net.self_attention, net.controlnet.controlnet_down_blocks,
                   net.controlnet.controlnet_mid_block):
        _perturb_(module, seed=1)
    net.save_pretrained(root / "consissr")
    dirs = {"backbone": tiny_backbone, "consissr": root / "consissr", "robust_clip": root / "robust_clip",
            "gan": root / "gan"}
    from consissr.models.gan import build_rrdbnet, save_gan

    torch.manual_seed(0)
    arch = {"scale": 4, "num_block": 1, "num_feat": 8, "num_grow_ch": 4}
    save_gan(build_rrdbnet(**arch), root / "gan", **arch)
    return dirs


@pytest.fixture(scope="module")
def pipe(parts):
    from consissr.inference.pipeline import load_pipeline

    pipe = load_pipeline(None, device="cpu", stage_dirs=parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _lq(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


FAST = {"num_inference_steps": 2, "output_type": "np", "tile_size": 512}  # untiled; tiling has its own test


def test_components_and_defaults(pipe):
    from diffusers import DDPMScheduler, DiffusionPipeline

    assert isinstance(pipe, DiffusionPipeline) and isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.unet is pipe.net.unet and pipe.controlnet is pipe.net.controlnet
    assert set(pipe.components) == {"vae", "text_encoder", "tokenizer", "scheduler", "net", "robust_clip", "gan"}
    assert pipe.defaults == InferenceParams() and pipe.scale == 4
    rec, gen = pipe.plan(mode="ganemb", preset="rec"), pipe.plan(mode="ganemb", preset="gen")
    assert (rec.t_max, rec.steps, gen.t_max, gen.steps) == (600, 10, 1000, 10)
    custom = pipe.plan(mode="ganemb", preset="gen", t_max=800, num_inference_steps=4)
    assert (custom.t_max, custom.steps) == (800, 4)
    full = pipe.plan(mode="full")
    assert (full.t_max, full.steps, full.guidance_scale) == (1000, 50, 1.0)
    with pytest.raises(ValueError, match="t_max"):
        pipe.plan(mode="full", t_max=600)
    with pytest.raises(ValueError, match="tile_size"):
        pipe.plan(tile_size=100)


def test_same_seed_same_image_and_odd_size(pipe):
    lq = _lq(45, 67)
    first = pipe(lq, seed=SEED, **FAST).images
    again = pipe(lq, seed=SEED, **FAST).images
    other = pipe(lq, seed=SEED + 1, **FAST).images
    assert first.shape == (1, 180, 268, 3) and first.dtype == np.float32
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3
    pil = pipe(_pil(lq), seed=SEED, num_inference_steps=1, tile_size=512).images[0]
    assert pil.size == (268, 180) and pil.mode == "RGB"
    assert pipe(lq, mode="ganemb", seed=SEED, **FAST).images.shape == (1, 180, 268, 3)


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.round(array * 255).astype(np.uint8))


@contextmanager
def recording(pipe):
    """Record (x_t, t) of every network call of the pipeline."""
    seen = []
    original = pipe.net.forward

    def record(x, t, *args, **kwargs):
        seen.append((x.clone(), int(t)))
        return original(x, t, *args, **kwargs)

    pipe.net.forward = record
    try:
        yield seen
    finally:
        del pipe.net.forward


def test_gan_mode_is_the_gan_alone_tiled_like_the_diffusion_modes(pipe, capsys):
    """mode='gan': Real-ESRGAN's output (Algorithm 2, l. 1) with no diffusion step — what `upscale --mode gan`
    and the demo's gan mode give; above tile_size output pixels RealESRGANer tiles it."""
    from consissr.models.gan import bilinear_init, gan_upscale

    lq = _lq(45, 67)
    saved = {k: v.clone() for k, v in pipe.gan.model.state_dict().items()}
    torch.manual_seed(0)
    bilinear_init(pipe.gan.model)  # a GAN whose output is a picture (the fixture's random one clamps to black)
    try:
        with recording(pipe) as seen:
            whole = pipe(lq, mode="gan", tile_size=512, output_type="np").images[0]
        assert seen == []  # no network call of the diffusion model
        assert whole.shape == (180, 268, 3) and whole.std() > 0.05
        # RealESRGANer on the whole image, at the pipeline's gan_precision (auto: bf16 on some CPUs)
        assert np.array_equal(whole, gan_upscale(pipe.gan, lq, precision=pipe.defaults.gan_precision))
        assert "Tile" not in capsys.readouterr().out
        tiled = pipe(lq, mode="gan", output_type="np").images[0]  # 268 output pixels > the default tile_size 256
        assert "Tile 2/2" in capsys.readouterr().out  # RealESRGANer's own tiles (64 LQ pixels)
        assert np.array_equal(tiled, pipe.gan_upscale(lq)) and np.abs(tiled - whole).mean() < 0.01
    finally:
        pipe.gan.model.load_state_dict(saved)
    with pytest.raises(ValueError, match="runs the GAN alone"):
        pipe.plan(mode="gan", t_max=600)


def test_full_mode_runs_the_spaced_chain_from_noise(pipe):
    with recording(pipe) as seen:
        pipe(_lq(16, 16), seed=SEED, num_inference_steps=5, color_fix="none", output_type="np")
    assert [t for _, t in seen] == [round(i * 999 / 4) for i in range(5)][::-1]
    x_T = torch.randn(seen[0][0].shape, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(seen[0][0], x_T)  # x_T ~ N(0, I), the first draw of the seeded generator


def test_ganemb_start_latent_and_first_timestep(pipe):
    from consissr.inference.tiling import pad_to_multiple, size_multiple

    lq = _lq(20, 12, seed=3)
    with recording(pipe) as seen:
        out = pipe(lq, mode="ganemb", preset="rec", seed=SEED, output_type="np").images
    assert out.shape == (1, 80, 48, 3)
    assert len(seen) == 10 and seen[0][1] == 600 - 1  # paper t_max = 600 ↔ diffusers index 599
    gan = torch.from_numpy(pipe.gan_upscale(lq)).permute(2, 0, 1)[None]
    z_gan = pipe.encode_image(pad_to_multiple(gan, size_multiple(pipe.vae, pipe.unet)))
    eps = torch.randn(z_gan.shape, generator=torch.Generator().manual_seed(SEED))
    ab = sd_alphas_cumprod()[599]
    expected = ab.sqrt() * z_gan.double() + (1 - ab).sqrt() * eps.double()
    torch.testing.assert_close(seen[0][0].double(), expected, rtol=1e-5, atol=1e-5)
    with recording(pipe) as gen_calls:
        pipe(lq, mode="ganemb", preset="gen", num_inference_steps=2, seed=SEED, output_type="np")
    gen = [t for _, t in gen_calls]
    assert gen == [999, 0]  # t_max = T = 1000 ↔ index 999


def test_guidance_with_equal_prompts_is_no_guidance_and_hpa_scale_matters(pipe):
    lq = _lq(16, 16, seed=4)
    plain = pipe(lq, seed=SEED, **FAST).images
    same = pipe(lq, seed=SEED, prompt="a cat", negative_prompt="a cat", guidance_scale=5.0, **FAST).images
    base = pipe(lq, seed=SEED, prompt="a cat", **FAST).images
    guided = pipe(lq, seed=SEED, prompt="a cat", negative_prompt="noise, blur", guidance_scale=5.0, **FAST).images
    np.testing.assert_allclose(same, base, atol=2e-3)  # ε_neg + g(ε_pos − ε_neg) = ε when the prompts agree
    assert np.abs(plain - base).mean() > 0 and np.abs(guided - base).mean() > 1e-3
    scale = pipe.net.hpa_scale
    no_image_prompt = pipe(lq, seed=SEED, hpa_scale=0.0, **FAST).images
    assert pipe.net.hpa_scale == scale and np.abs(no_image_prompt - plain).mean() > 1e-4


def test_tiled_and_untiled_agree_on_a_small_image(pipe):
    """Tiling changes the output less than a change of seed does.

    A 24² → 96² image with 64-px tiles. The tiles do not compute the same function as the whole image: a tile's UNet attends to its
    window only, GroupNorm statistics are per window, the positional table is resized to the
    window, and the VAE's GroupNorms see one tile. So tiled ≠ untiled by construction; the
    bound below says the blend hides it well: the mean absolute difference is under a quarter
    of what a different seed changes (the sampler's own spread), and under 0.05 of the range.
    """
    lq = _lq(24, 24, seed=5)
    kw = {"num_inference_steps": 2, "color_fix": "none", "output_type": "np"}
    whole = pipe(lq, seed=SEED, tile_size=256, **kw).images
    tiled = pipe(lq, seed=SEED, tile_size=64, tile_overlap=32, **kw).images  # 2×2 latent windows, 3×3 VAE tiles
    reseeded = pipe(lq, seed=SEED + 1, tile_size=256, **kw).images
    diff, spread = np.abs(tiled - whole).mean(), np.abs(reseeded - whole).mean()
    assert tiled.shape == whole.shape == (1, 96, 96, 3)
    assert 0 < diff < 0.25 * spread and diff < 0.05, (diff, spread)


def test_callback_sees_every_step(pipe):
    steps, seen = [], []

    def callback(p, i, t, kwargs):
        steps.append((i, int(t)))
        seen.append((kwargs["latents"].clone(), kwargs["pred_original_sample"].clone()))
        return {"latents": kwargs["latents"]}

    pipe(_lq(16, 16), seed=SEED, num_inference_steps=3, output_type="np", callback_on_step_end=callback)
    assert steps == [(0, 999), (1, 500), (2, 0)]
    # x̂0 (Fig. 8): at t = 0 the DDPM step returns x̂0 itself (ᾱ_prev = 1, no noise); earlier it is not x_{t-1}
    assert torch.allclose(seen[-1][0], seen[-1][1], atol=1e-5)
    assert not torch.allclose(seen[0][0], seen[0][1], atol=1e-2)


def test_save_and_load_give_the_same_output(pipe, tmp_path):
    from consissr.inference.pipeline import ConsisSRPipeline, load_pipeline

    lq = _lq(20, 28, seed=6)
    mode = {"mode": "ganemb", "preset": "rec", "num_inference_steps": 3}
    before = pipe(lq, seed=SEED, output_type="np", **mode).images
    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "model_index.json").is_file()
    loaded = load_pipeline(tmp_path / "model", device="cpu")
    assert isinstance(loaded, ConsisSRPipeline)
    loaded.set_progress_bar_config(disable=True)
    after = loaded(lq, seed=SEED, output_type="np", **mode).images
    assert np.array_equal(before, after)
    np.testing.assert_array_equal(loaded.gan_upscale(lq), pipe.gan_upscale(lq))
    assert loaded.defaults == pipe.defaults and loaded.training_info == pipe.training_info
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        ConsisSRPipeline.from_pretrained(tmp_path / "nothing")


def test_load_pipeline_names_a_missing_stage_output(parts, tmp_path):
    from consissr.inference.pipeline import load_pipeline

    with pytest.raises(FileNotFoundError, match="consissr"):
        load_pipeline(None, device="cpu", stage_dirs={**parts, "consissr": tmp_path / "consissr"})
