"""The one image reader (consissr.data.images) and ids that do not depend on where the data lives."""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from consissr.config import DegradeParams, PrepareParams
from consissr.data.degradation import degrade_folder
from consissr.data.images import ImageError, orient, read_image
from consissr.data.sources import prepare


def bomb_png(path, w=16000, h=14000):
    """A valid all-black RGB PNG of w×h pixels, about 0.7 MB on disk, written without decoding it.

    Deflate output after a full flush depends only on the input, so one compressed block of 100 rows
    is repeated; the stream ends with an empty final block and the Adler-32 of all the rows."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    rows = b"\x00" * ((1 + 3 * w) * 100)
    comp = zlib.compressobj(9)
    head = comp.compress(rows) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(rows) + comp.flush(zlib.Z_FULL_FLUSH)
    adler = 1
    for _ in range(h // 100):
        adler = zlib.adler32(rows, adler)
    idat = head[:2] + block * (h // 100) + b"\x03\x00" + struct.pack(">I", adler)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory):
    """A valid 12000×9000 photo-like JPEG (108 Mpx, above PIL's 89.5 Mpx default)."""
    img = Image.new("RGB", (12000, 9000), (40, 90, 160))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        draw.rectangle([i * 1000, (i % 3) * 3000, i * 1000 + 700, (i % 3) * 3000 + 2500], fill=(20 * i, 200, 255 - 20 * i))
    path = tmp_path_factory.mktemp("big") / "big.jpg"
    img.save(path, quality=85)
    return path


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = bomb_png(tmp_path / "bomb.png")
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match=r"bomb\.png: larger than the limit: 224000000 pixels > 89478485"):
        read_image(path)
    with pytest.raises(ImageError, match="larger than the limit"):  # a PNG cannot be decoded reduced
        read_image(path, min_side=16)
    # a limit set above it: PIL's own check does not fire either (the reader's limit replaces it)
    assert read_image(bomb_png(tmp_path / "small.png", 400, 300), max_pixels=200_000).size == (400, 300)
    with pytest.raises(ImageError, match="120000 pixels > 80000"):
        read_image(tmp_path / "small.png", max_pixels=80_000)


def test_a_large_jpeg_is_refused_whole_or_read_at_a_reduced_scale_the_crops_allow(big_jpeg):
    with pytest.raises(ImageError, match=r"larger than the limit: 108000000 pixels > 89478485"):
        read_image(big_jpeg)  # upscale's use: no reduction allowed
    img = read_image(big_jpeg, min_side=512)
    assert img.size == (6000, 4500) and "1/2 scale" in " ".join(img.notes)
    # the colours of the drawing survive the reduced decode (rectangle 1 at x 1000..1700, y 3000..5500)
    assert np.abs(img.pixels[2000, 650].astype(int) - (20, 200, 235)).max() <= 6
    assert read_image(big_jpeg, min_side=512, max_pixels=2_000_000).size == (1500, 1125)  # 1/8
    with pytest.raises(ImageError, match="larger than the limit"):  # 1/8 would cut below the crop
        read_image(big_jpeg, min_side=2000, max_pixels=2_000_000)


def test_reading_a_large_jpeg_reduced_keeps_memory_bounded(big_jpeg):
    # a fresh process: its peak resident size is the reader's, not this test session's
    code = ("import resource, sys; from consissr.data.images import read_image\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "img = read_image(sys.argv[1], min_side=512)\n"
            "print(img.size, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", code, str(big_jpeg)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd())).stdout.split()
    grown = int(out[-1]) * 1024
    # less than the full-size RGB pixels alone (a full decode peaks at ~2.5x that: PIL's 4-byte
    # pixels plus the array; measured 779 MiB here against 234 MiB at 1/2 scale)
    assert grown < 12000 * 9000 * 3, grown / 2**20


def test_the_crop_limit_still_rejects_a_very_wide_strip(tmp_path):
    Image.new("RGB", (40000, 20), (10, 20, 30)).save(tmp_path / "strip.png")
    assert read_image(tmp_path / "strip.png").size == (40000, 20)  # readable: 0.8 Mpx
    bomb_png(tmp_path / "bomb.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "ok.png")
    report = prepare(PrepareParams(sources=(str(tmp_path),), crop_size=32, crops_per_image=1),
                     out_dir=tmp_path.parent / f"{tmp_path.name}_out", seed=0)
    reasons = {r["path"]: r["reason"] for r in report["skipped"]}
    assert reasons == {"bomb.png": "larger than the limit: 224000000 pixels > 89478485 (16000x14000)",
                       "strip.png": "smaller than the crop: 40000x20 < prepare.crop_size 32"}


def test_prepare_uses_a_large_jpeg_at_half_scale(big_jpeg, tmp_path):
    report = prepare(PrepareParams(sources=(str(big_jpeg.parent),), crop_size=256, crops_per_image=2),
                     out_dir=tmp_path / "out", seed=0)
    assert report["skipped"] == [] and report["crops_written"] == 2
    assert "1/2 scale" in " ".join(report["normalised"][0]["how"])
    index = json.loads((tmp_path / "out" / "index.json").read_text())["items"]
    for item in index:
        x, y, s, _ = item["box"]
        assert x + s <= 6000 and y + s <= 4500


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation):
    rgb = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(tmp_path / "o.png", exif=exif)
    with Image.open(tmp_path / "o.png") as img:
        expected = np.asarray(ImageOps.exif_transpose(img))
    got = read_image(tmp_path / "o.png")
    assert np.array_equal(got.pixels, expected)
    assert np.array_equal(orient(rgb, orientation), expected)
    assert ("EXIF orientation" in " ".join(got.notes)) == (orientation != 1)


def test_16_bit_and_alpha_are_kept(tmp_path):
    rng = np.random.default_rng(0)
    rgba16 = rng.integers(0, 65536, (5, 7, 4)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgba16.png"), cv2.cvtColor(rgba16, cv2.COLOR_RGBA2BGRA))
    img = read_image(tmp_path / "rgba16.png")
    assert img.bits == 16 and img.has_alpha and not img.is_gray
    assert np.array_equal(img.pixels, rgba16)
    assert np.allclose(img.color_float(), rgba16[..., :3] / 65535.0, atol=1e-6)
    assert np.allclose(img.alpha_float(), rgba16[..., 3] / 65535.0, atol=1e-6)
    gray16 = rng.integers(0, 65536, (5, 7)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "gray16.png"), gray16)
    g = read_image(tmp_path / "gray16.png")
    assert g.is_gray and g.bits == 16 and not g.has_alpha and np.array_equal(g.pixels[..., 0], gray16)
    assert g.color_float().shape == (5, 7, 3)
    Image.fromarray(gray16[..., None].repeat(2, 2).astype(np.uint8), "LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png").pixels.shape == (5, 7, 2)


# ---------------------------------------------------------------------------------------------
# ids relative to their source
# ---------------------------------------------------------------------------------------------
def _photos(root):
    """A folder source (two classes, ImageNet-like) and a list file with a name that clashes with it."""
    rng = np.random.default_rng(3)
    for rel in ("photos/n01/n01_1.png", "photos/n01/n01_2.jpg", "photos/n02/n02_1.png", "photos/a.png",
                "extra/a.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)).save(root / rel, quality=95)
    (root / "extra" / "list.txt").write_text("a.png\n")


def _run(workspace, sources, monkeypatch):
    """prepare + degrade from ``workspace`` with relative output folders, as `dvc repro` runs them."""
    workspace.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(workspace)
    prepare(PrepareParams(sources=sources, crop_size=80, crops_per_image=1), out_dir="prepared", seed=7)
    degrade_folder("prepared", "degraded", DegradeParams(), seed=7)
    return {p.relative_to(workspace).as_posix(): p.read_bytes()
            for p in sorted(workspace.rglob("*")) if p.is_file()}


def test_moving_the_data_changes_no_output_byte(tmp_path, monkeypatch):
    first = tmp_path / "mnt1" / "data"
    _photos(first)
    second = tmp_path / "mnt2" / "deeper" / "copy"
    shutil.copytree(first, second)
    a = _run(tmp_path / "ws_a", (str(first / "photos"), str(first / "extra" / "list.txt")), monkeypatch)
    b = _run(tmp_path / "ws_b", (str(second / "photos"), str(second / "extra" / "list.txt")), monkeypatch)
    rel_ws = first / "ws_rel"  # the same data named by relative paths
    c = _run(rel_ws, ("../photos", "../extra/list.txt"), monkeypatch)
    assert sorted(a) == sorted(b) == sorted(c)
    assert "prepared/index.json" in a and "degraded/index.json" in a and len(a) == 2 + 2 * 5 + 2 + 5
    for name in a:
        assert a[name] == b[name] == c[name], name
    index = json.loads(a["prepared/index.json"])["items"]
    # the path below the folder; the list's line; the source's position only for the name both share
    assert {i["id"]: i["source"] for i in index} == {
        "n01_n01_1_c0": "n01/n01_1.png", "n01_n01_2_c0": "n01/n01_2.jpg", "n02_n02_1_c0": "n02/n02_1.png",
        "s0_a_c0": "a.png", "s1_a_c0": "a.png"}
