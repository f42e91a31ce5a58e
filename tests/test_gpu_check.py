"""benchmarks/gpu_check.py: the tiny profile end to end on CPU; the in-repo SD 2.1-base configs of the paper profile."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from benchmarks import gpu_check


def test_gpu_check_tiny_profile_runs_on_cpu(tmp_path):
    from diffusers import UNet2DConditionModel

    from consissr.models.backbone import TINY_CROP_SIZE, tiny_unet_config, tiny_vae_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a shared CPU
    try:
        record = gpu_check.main(["--tiny", "--device", "cpu", "--steps", "1", "--repeats", "1", "--full-steps", "2",
                                 "--out", str(tmp_path / "gpu_check.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(record, default=str))
    assert (record["profile"], record["device"]) == ("tiny", "cpu")
    assert record["model"]["image_tokens"] == "clip_embedding"
    vae = tiny_vae_config()
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**tiny_unet_config(vae["latent_channels"], TINY_CROP_SIZE // factor))
    assert record["model"]["unet_parameters"] == sum(p.numel() for p in unet.parameters())

    step = record["train_sdsr_step"]
    assert (step["batch"], step["crop"], step["latent"]) == (2, 64, 64 // factor)
    assert 0 < step["trainable_parameters"] < record["model"]["unet_parameters"] + record["model"]["controlnet_parameters"]
    for key in ("gradient_checkpointing", "no_gradient_checkpointing"):
        assert step[key]["seconds_per_step"] > 0, key
        assert len(step[key]["losses"]) == 2 and all(math.isfinite(v) for v in step[key]["losses"]), key
    for name in ("ganemb-rec-10", "full-2"):
        run = record["inference"][name]
        assert run["seconds"] > 0 and run["output_shape"] == [1, 64, 64, 3], name


def test_paper_profile_builds_sd21_base_from_the_repo_configs():
    """The committed configs build SD 2.1-base's released parameter counts (meta device, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from consissr.models.info import SD21_BASE_UNET_PARAMETERS

    profile = gpu_check.paper_profile()
    assert (profile.out_size, profile.batch, profile.dtype) == (512, 8, torch.bfloat16)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(profile.unet)
        vae = AutoencoderKL.from_config(profile.vae)
        text = CLIPTextModel(CLIPTextConfig.from_dict(profile.text_encoder))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (SD21_BASE_UNET_PARAMETERS, 83_653_863, 340_387_840)
    # latents 64² at 512² crops; the cross-attention reads 1024 = ViT-H-14's embedding width (clip_embedding)
    assert profile.out_size // 2 ** (len(profile.vae["block_out_channels"]) - 1) == 64
    assert unet.config.cross_attention_dim == text.config.hidden_size == 1024
    assert profile.params.model.image_tokens == "clip_embedding" and profile.clip_name == "ViT-H-14"
