"""Robust CLIP (paper §3.2, Eq. 3) on the tiny open_clip config, CPU, a few seconds."""

from __future__ import annotations

import importlib.resources
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from consissr.config import ClipParams  # noqa: E402
from consissr.errors import InputError  # noqa: E402
from consissr.models.robust_clip import (  # noqa: E402
    CONFIG_NAME,
    WEIGHTS_NAME,
    RobustCLIP,
    robust_clip_loss,
)

TINY = "consissr-tiny-vit"


def _tiny(seed: int = 0, **kwargs) -> RobustCLIP:
    torch.manual_seed(seed)
    return RobustCLIP(model_name=TINY, **kwargs)


def _batch(seed: int = 0, size: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """(lq, hq): a clean batch and a blurred, noisy copy of it, both in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    hq = torch.rand(4, 3, size, size, generator=g)
    lq = F.interpolate(F.avg_pool2d(hq, 4), size=(size, size), mode="bilinear")
    lq = (lq + 0.1 * torch.randn(lq.shape, generator=g)).clamp(0, 1)
    return lq, hq


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert value.dtype == b[k].dtype, k
        assert torch.equal(value, b[k]), k


def _adam(model: RobustCLIP) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(trainable, lr=1e-4, betas=(0.9, 0.99))


# --------------------------------------------------------------------------------------------
def test_tiny_config_ships_and_builds_through_open_clip():
    cfg_file = importlib.resources.files("consissr.models") / "clip_configs" / f"{TINY}.json"
    cfg = json.loads(cfg_file.read_text())
    assert TINY in open_clip.list_models()
    model, _, _ = open_clip.create_model_and_transforms(TINY, pretrained=None)
    assert model.visual.image_size == (224, 224)
    assert model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, cfg["embed_dim"])

    robust = _tiny()
    assert robust.embed_dim == cfg["embed_dim"] == 64
    assert robust.student_embeds(torch.rand(2, 3, 64, 64)).shape == (2, 64)
    # only the visual towers are kept: no text-tower parameters anywhere
    n_visual = sum(p.numel() for p in model.visual.parameters())
    assert sum(p.numel() for p in robust.parameters()) == 2 * n_visual
    names = [k for k, _ in robust.named_parameters()]
    assert all(k.startswith(("teacher.", "student.")) for k in names)
    assert not any("token_embedding" in k for k in names)


def test_paper_config_embed_dim():
    assert open_clip.get_model_config("ViT-H-14")["embed_dim"] == 1024


def test_student_equals_teacher_at_init():
    robust = _tiny()
    lq, hq = _batch()
    _assert_state_equal(_state(robust.student), _state(robust.teacher))
    teacher = robust.teacher_embeds(hq)
    robust.eval()
    with torch.no_grad():  # the same kernels as the teacher's: bit-equal
        assert torch.equal(robust.student_embeds(hq), teacher)
    robust.train()  # train mode with autograd may take another attention kernel: fp32 noise
    student = robust.student_embeds(hq)
    torch.testing.assert_close(student, teacher, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(student, robust.student_embeds(lq))  # the embedding sees the input
    assert robust_clip_loss(student, teacher).item() < 1e-10
    assert robust_clip_loss(robust.student_embeds(lq), teacher).item() > 1e-3


def test_teacher_frozen_student_trainable_and_loss_decreases():
    robust = _tiny().train()
    assert all(not p.requires_grad for p in robust.teacher.parameters())
    assert all(p.requires_grad for p in robust.student.parameters())
    assert not robust.teacher.training and robust.student.training
    teacher0, student0 = _state(robust.teacher), _state(robust.student)

    lq, hq = _batch()
    opt = _adam(robust)
    losses = []
    for _ in range(6):
        loss = robust(lq, hq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0
    assert losses[-1] < 0.5 * losses[0], losses
    _assert_state_equal(_state(robust.teacher), teacher0)
    changed = [k for k, v in _state(robust.student).items() if not torch.equal(v, student0[k])]
    assert len(changed) > len(student0) // 2
    assert all(p.grad is None for p in robust.teacher.parameters())


def test_preprocess_matches_open_clip_pil_transform():
    robust = _tiny()
    for h, w in [(100, 150), (300, 451), (500, 64)]:
        out = robust.preprocess(torch.rand(2, 3, h, w))
        assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
    # a constant grey image normalises to exactly (0.5 - mean) / std per channel
    mean, std = (torch.tensor(robust.preprocess_cfg[k]).view(3, 1, 1) for k in ("mean", "std"))
    grey = robust.preprocess(torch.full((1, 3, 123, 77), 0.5))[0]
    torch.testing.assert_close(grey, ((0.5 - mean) / std).expand(3, 224, 224))
    # a real photo (non-square, not 224): our tensor path vs open_clip's own PIL transform
    from skimage import data

    # (measured: mean |diff| ~0.004, about PIL's uint8 rounding; a non-antialiased bilinear
    # resize gives 0.013-0.03)
    _, _, preprocess_val = open_clip.create_model_and_transforms(TINY, pretrained=None)
    for photo in (data.chelsea(), data.astronaut()):  # 300 x 451 and 512 x 512 RGB uint8
        reference = preprocess_val(Image.fromarray(photo))
        ours = robust.preprocess(torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255)[0]
        assert ours.shape == reference.shape == (3, 224, 224)
        diff = (ours - reference).abs()
        assert diff.mean() < 0.006 and diff.max() < 0.1, (diff.mean(), diff.max())
    # grayscale (1-channel) batches are converted to RGB like open_clip's MaybeConvertMode
    assert robust.preprocess(torch.rand(1, 1, 50, 60)).shape == (1, 3, 224, 224)
    with pytest.raises(ValueError):
        robust.preprocess(torch.rand(3, 224, 224))


def test_save_load_roundtrip_bit_exact(tmp_path):
    robust = _tiny(seed=3)
    lq, hq = _batch(1)
    opt = _adam(robust)
    robust(lq, hq).backward()
    opt.step()
    assert not torch.equal(robust.student_embeds(hq), robust.teacher_embeds(hq))

    robust.save_pretrained(tmp_path / "clip")
    # no temp files left behind
    assert sorted(os.listdir(tmp_path / "clip")) == [CONFIG_NAME, WEIGHTS_NAME]
    config = json.loads((tmp_path / "clip" / CONFIG_NAME).read_text())
    assert config["model_name"] == TINY and config["pretrained"] is None
    assert config["image_size"] == 224 and config["embed_dim"] == 64
    _assert_state_equal(load_file(tmp_path / "clip" / WEIGHTS_NAME), _state(robust.student))

    restored = RobustCLIP.from_pretrained(tmp_path / "clip", with_teacher=False)
    assert restored.teacher is None
    _assert_state_equal(_state(restored.student), _state(robust.student))
    assert torch.equal(restored.student_embeds(lq), robust.student_embeds(lq))
    with pytest.raises(RuntimeError, match="with_teacher=False"):
        restored.teacher_embeds(hq)


def _write_open_clip_dir(folder, seed: int) -> dict[str, torch.Tensor]:
    """A tiny open_clip model saved the way open_clip reads it (hub / local-dir layout)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY, pretrained=None)
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": open_clip.get_model_config(TINY),
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }))
    return {k[len("visual."):]: v for k, v in model.state_dict().items() if k.startswith("visual.")}


def test_pretrained_weights_load_through_open_clip(tmp_path):
    visual = _write_open_clip_dir(tmp_path / "hub", seed=7)
    # open_clip's own (hub / local-dir) layout, preprocess cfg included
    local = RobustCLIP(model_name=f"local-dir:{tmp_path / 'hub'}")
    _assert_state_equal(_state(local.teacher), visual)
    _assert_state_equal(_state(local.student), visual)
    assert local.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
    # the checkpoint file as `pretrained`, the path a laion2b tag's download takes
    checkpoint = tmp_path / "hub" / "open_clip_model.safetensors"
    from_file = _tiny(seed=0, pretrained=str(checkpoint))
    _assert_state_equal(_state(from_file.teacher), visual)
    with pytest.raises(ValueError, match="pretrained must be None"):
        RobustCLIP(model_name=f"local-dir:{tmp_path / 'hub'}", pretrained=str(checkpoint))

    # train, save, then restore with and without the teacher's weights
    lq, hq = _batch(2)
    opt = _adam(from_file)
    from_file(lq, hq).backward()
    opt.step()
    from_file.save_pretrained(tmp_path / "robust")
    with_teacher = RobustCLIP.from_pretrained(tmp_path / "robust", with_teacher=True)
    _assert_state_equal(_state(with_teacher.teacher), visual)
    _assert_state_equal(_state(with_teacher.student), _state(from_file.student))

    checkpoint.unlink()  # the teacher's pretrained weights are gone
    inference = RobustCLIP.from_pretrained(tmp_path / "robust")
    _assert_state_equal(_state(inference.student), _state(from_file.student))
    assert torch.equal(inference.student_embeds(lq), from_file.student_embeds(lq))
    with pytest.raises(InputError, match="open_clip_model.safetensors: CLIP weights file not found"):
        RobustCLIP.from_pretrained(tmp_path / "robust", with_teacher=True)


def test_restore_keeps_saved_preprocess_cfg(tmp_path):
    _write_open_clip_dir(tmp_path / "hub", seed=1)
    local = RobustCLIP(model_name=f"local-dir:{tmp_path / 'hub'}")
    local.save_pretrained(tmp_path / "robust")
    restored = RobustCLIP.from_pretrained(tmp_path / "robust")
    assert restored.preprocess_cfg == local.preprocess_cfg
    x = torch.rand(2, 3, 80, 90)
    assert torch.equal(restored.preprocess(x), local.preprocess(x))


def test_bfloat16(tmp_path):
    robust = _tiny(dtype=torch.bfloat16)
    assert {p.dtype for p in robust.parameters()} == {torch.bfloat16}
    lq, hq = _batch()
    assert robust.student_embeds(lq).dtype == torch.bfloat16
    loss = robust(lq, hq)
    assert loss.dtype == torch.float32 and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in robust.student.parameters()]
    assert all(g is not None and g.dtype == torch.bfloat16 for g in grads)
    robust.save_pretrained(tmp_path / "bf16")
    restored = RobustCLIP.from_pretrained(tmp_path / "bf16")
    _assert_state_equal(_state(restored.student), _state(robust.student))


def test_from_params():
    torch.manual_seed(0)
    robust = RobustCLIP.from_params(ClipParams())
    assert (robust.model_name, robust.pretrained, robust.image_size) == (TINY, None, 224)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16():
    robust = _tiny(device="cuda", dtype=torch.bfloat16)
    lq, hq = (t.cuda() for t in _batch())
    loss = robust(lq, hq)
    loss.backward()
    assert loss.is_cuda and robust.student_embeds(lq).device.type == "cuda"
    cpu = _tiny()
    torch.testing.assert_close(robust.teacher_embeds(hq).float().cpu(),
                               cpu.teacher_embeds(hq.cpu()), atol=0.1, rtol=0.05)
