"""Stage `backbone` and the loader: the embedded tiny SD twin goes through SD's own format and calls."""

import json

import pytest
import torch

from consissr.config import BackboneParams
from consissr.models.backbone import SD_SCHEDULE, build_tiny_backbone, load_backbone, resolve_source, write_backbone


def test_tiny_backbone_is_saved_in_the_stable_diffusion_layout(tiny_backbone):
    from diffusers import StableDiffusionPipeline

    index = json.loads((tiny_backbone / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(index)
    # diffusers' own pipeline loader reads it like any SD checkpoint directory
    pipe = StableDiffusionPipeline.from_pretrained(tiny_backbone, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # the UNet works on the VAE's latent (the embedded VAE: 4x down, 8 channels)
    assert pipe.vae_scale_factor == 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == pipe.vae.config.latent_channels == 8


def test_loader_returns_frozen_components_with_sd_schedule(tiny_backbone):
    bb = load_backbone("embedded", embedded_dir=tiny_backbone)
    for module in (bb.unet, bb.vae, bb.text_encoder):
        assert not any(p.requires_grad for p in module.parameters()) and not module.training
    assert type(bb.noise_scheduler).__name__ == "DDPMScheduler"
    for key, value in SD_SCHEDULE.items():
        assert bb.noise_scheduler.config[key] == value, key
    # SD 2.1's scaled-linear betas: sqrt-spaced between 0.00085 and 0.012
    betas = bb.noise_scheduler.betas.double()
    expected = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(betas, expected, rtol=1e-6, atol=1e-9)
    # an untrained VAE (no train_vae output given) is left unscaled; train_vae sets 1/std
    assert bb.vae.config.scaling_factor == 1.0


def test_tokenizer_is_the_real_clip_bpe(tiny_backbone):
    import open_clip

    bb = load_backbone("embedded", embedded_dir=tiny_backbone)
    prompt = "a photo of a cat, high quality, 4k photograph"
    ours = bb.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    theirs = open_clip.get_tokenizer("ViT-H-14")(prompt)[0]
    assert torch.equal(ours, theirs)  # SD 2.1 uses OpenCLIP ViT-H's tokenizer


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = build_tiny_backbone(tmp_path / "a", seed=1)
    b = build_tiny_backbone(tmp_path / "b", seed=1)
    c = build_tiny_backbone(tmp_path / "c", seed=2)
    f = "unet/diffusion_pytorch_model.safetensors"
    assert (a / f).read_bytes() == (b / f).read_bytes() != (c / f).read_bytes()
    assert not (tmp_path / "a.tmp").exists()


def test_a_real_backbone_is_recorded_by_name_not_downloaded(tmp_path):
    out = write_backbone(BackboneParams(pretrained="stabilityai/stable-diffusion-2-1-base"), out_dir=tmp_path / "bb", seed=0)
    assert json.loads((out / "source.json").read_text())["pretrained"] == "stabilityai/stable-diffusion-2-1-base"
    assert resolve_source("/models/sd21") == "/models/sd21"


def test_missing_embedded_backbone_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="consissr backbone"):
        load_backbone("embedded", embedded_dir=tmp_path / "nothing")


def test_saved_backbone_does_not_depend_on_the_environment(tmp_path, tiny_backbone):
    """DVC hashes this folder: HF_HUB_OFFLINE (set in tests, maybe not by users) must not leak in."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = "import sys; from consissr.models.backbone import build_tiny_backbone; build_tiny_backbone(sys.argv[1], seed=0)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "online")], env=env, check=True, capture_output=True)
    files = sorted(p.relative_to(tiny_backbone) for p in tiny_backbone.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "online") for p in (tmp_path / "online").rglob("*") if p.is_file())
    for rel in files:
        assert (tiny_backbone / rel).read_bytes() == (tmp_path / "online" / rel).read_bytes(), rel
