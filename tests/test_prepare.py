"""Stage `prepare`: sources, bad inputs (normalised or skipped with a reason), contamination guard."""

import json
import logging

import cv2
import numpy as np
import pytest
from conftest import shared_data
from PIL import Image

from consissr.config import PrepareParams
from consissr.data.sources import ContaminationError, load_rgb, prepare
from consissr.errors import InputError

CROP = 32


def photo(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def rgb16():
    return np.random.default_rng(5).integers(0, 65536, (48, 64, 3)).astype(np.uint16)


def make_bad_folder(folder):
    """One file per bad-input case; returns {name: expected 'normalised' or 'skipped'}."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = photo()
    Image.fromarray(rgb).save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image\n")
    buf = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(buf[: len(buf) // 3])
    rgba = np.dstack([photo(seed=1), np.full((48, 64), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(photo(seed=2)[..., 0]).convert("LA").save(folder / "la.png")
    pal = Image.fromarray(photo(seed=3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(folder / "palette_alpha.png", transparency=0)
    cv2.imwrite(str(folder / "gray16.png"), (photo(seed=4)[..., 0].astype(np.uint16) * 257))
    cv2.imwrite(str(folder / "rgb16.png"), cv2.cvtColor(rgb16(), cv2.COLOR_RGB2BGR))
    Image.fromarray(photo(seed=6)[..., 0]).save(folder / "gray.png")
    Image.fromarray(photo(seed=7)).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(photo(seed=8)).save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    Image.fromarray(photo(h=20, w=40, seed=9)).save(folder / "tiny.png")
    return {
        "good.png": None, "rgba.png": "alpha", "la.png": "alpha", "palette_alpha.png": "alpha",
        "gray16.png": "16-bit", "rgb16.png": "16-bit", "gray.png": "grayscale", "cmyk.jpg": "CMYK",
        "exif_rotated.jpg": "EXIF orientation 6",
        "empty.png": "empty file", "notes.jpg": "not an image", "truncated.png": "corrupt",
        "tiny.png": "smaller than the crop",
    }


def run(folder, out, **kw):
    p = PrepareParams(sources=(str(folder),), crop_size=CROP, crops_per_image=2, **kw)
    return prepare(p, out_dir=out, seed=0)


def test_every_bad_input_is_normalised_or_skipped_with_a_reason(tmp_path, caplog):
    expected = make_bad_folder(tmp_path / "src")
    with caplog.at_level(logging.INFO, logger="consissr"):
        report = run(tmp_path / "src", tmp_path / "out")
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk == report
    skipped = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in report["skipped"]}
    normalised = {r["path"].rsplit("/", 1)[-1]: " ".join(r["how"]) for r in report["normalised"]}
    for name, what in expected.items():
        if what in ("empty file", "not an image", "corrupt", "smaller than the crop"):
            assert what in skipped.get(name, ""), (name, skipped)
            assert any(name in rec.getMessage() and "skip" in rec.getMessage() for rec in caplog.records)
        elif what is not None:
            assert what in normalised.get(name, ""), (name, normalised)
    assert set(skipped) == {"empty.png", "notes.jpg", "truncated.png", "tiny.png"}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    # 9 usable images x 2 crops, all RGB, crop-sized
    assert report["crops_written"] == len(index["items"]) == 18
    for item in index["items"]:
        with Image.open(tmp_path / "out" / "hq" / f"{item['id']}.png") as img:
            assert (img.mode, img.size) == ("RGB", (CROP, CROP))


def test_normalisations_keep_the_pixels(tmp_path):
    make_bad_folder(tmp_path)
    gray, _ = load_rgb(tmp_path / "gray16.png")
    assert gray.dtype == np.uint8 and gray.shape == (48, 64, 3)
    assert np.array_equal(gray[..., 0], photo(seed=4)[..., 0]) and np.array_equal(gray[..., 0], gray[..., 2])
    rgb16_, _ = load_rgb(tmp_path / "rgb16.png")
    expected = np.round(rgb16().astype(float) / 257).astype(np.uint8)
    assert not np.array_equal(expected, (rgb16() >> 8).astype(np.uint8))  # truncation would differ
    assert np.array_equal(rgb16_, expected)  # all 16 bits read and rounded
    rotated, notes = load_rgb(tmp_path / "exif_rotated.jpg")
    assert rotated.shape == (64, 48, 3) and notes  # width and height swapped by the rotation
    rgba, _ = load_rgb(tmp_path / "rgba.png")
    src = photo(seed=1).astype(float)
    assert np.abs(rgba - (src * 128 / 255 + 255 * 127 / 255)).max() <= 1.0  # composited on white
    pal, _ = load_rgb(tmp_path / "palette_alpha.png")
    assert pal.shape == (48, 64, 3)


def test_all_bad_fails_with_a_clear_message_and_keeps_the_previous_output(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(photo()).save(good / "a.png")
    run(good, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out" / "hq").iterdir())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.png").write_text("nope")
    with pytest.raises(InputError, match=r"none of the 2 input files .* could be used .*a\.png: empty file"):
        run(bad, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "hq").iterdir()) == before


def test_crops_are_deterministic_per_image_and_seed(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo(seed=i)).save(src / f"{i}.png")
    list_file = tmp_path / "list.txt"
    list_file.write_text("src/2.png\n# a comment\nsrc/0.png\n")
    a = json.loads(json.dumps(run(src, tmp_path / "a")))
    run(src, tmp_path / "b")
    ia = json.loads((tmp_path / "a" / "index.json").read_text())["items"]
    ib = json.loads((tmp_path / "b" / "index.json").read_text())["items"]
    assert ia == ib and a["crops_written"] == 6
    # the same image through a list file gets the same boxes only if its key is the same; here
    # the key differs (another source), but each image's crops stay inside the image
    p = PrepareParams(sources=(str(list_file),), crop_size=CROP, crops_per_image=2)
    prepare(p, out_dir=tmp_path / "c", seed=0)
    ic = json.loads((tmp_path / "c" / "index.json").read_text())["items"]
    assert [i["source"].rsplit("/", 1)[-1] for i in ic] == ["2.png", "2.png", "0.png", "0.png"]
    p2 = PrepareParams(sources=(str(src),), crop_size=CROP, crops_per_image=2)
    prepare(p2, out_dir=tmp_path / "d", seed=1)
    id_ = json.loads((tmp_path / "d" / "index.json").read_text())["items"]
    assert [i["box"] for i in id_] != [i["box"] for i in ia]


def test_embedded_source_needs_no_files(tmp_path):
    report = prepare(PrepareParams(sources=("embedded",), crop_size=64, crops_per_image=1), out_dir=tmp_path, seed=0)
    assert report["images_used"] == 10 and report["skipped"] == []


def test_contamination_guard_names_both_files(tmp_path):
    train, evals = tmp_path / "train", tmp_path / "eval"
    train.mkdir(), evals.mkdir()
    Image.fromarray(photo(seed=1)).save(train / "ok.png")
    Image.fromarray(photo(seed=2)).save(train / "leak.png")
    # the same pixels in another format: the guard compares decoded pixels, not bytes
    Image.fromarray(photo(seed=2)).save(evals / "val_0002.bmp")
    with pytest.raises(ContaminationError, match=r"leak\.png.*val_0002\.bmp"):
        run(train, tmp_path / "out", eval_dirs=(str(evals),))
    (train / "leak.png").unlink()
    report = run(train, tmp_path / "out", eval_dirs=(str(evals),))
    assert report["images_used"] == 1


def test_shared_sample_photos_prepare(tmp_path):
    folder = shared_data("train", "CBSD68")
    report = prepare(PrepareParams(sources=(str(folder),), crop_size=128, crops_per_image=1), out_dir=tmp_path, seed=0)
    assert report["images_used"] == report["files_seen"] >= 60


def test_files_whose_names_slug_alike_are_all_kept_and_repeats_are_reported(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(["a-b.png", "a_b.png", "c.png", "c.jpg"]):
        Image.fromarray(photo(seed=10 + i)).save(src / name, quality=95)
    listing = tmp_path / "list.txt"
    listing.write_text("src/c.png\nsrc/c.png\n")
    p = PrepareParams(sources=(str(src), str(listing)), crop_size=CROP, crops_per_image=1)
    report = prepare(p, out_dir=tmp_path / "out", seed=0)
    index = json.loads((tmp_path / "out" / "index.json").read_text())["items"]
    assert report["images_used"] == 4 and len({i["id"] for i in index}) == 4
    assert [d["path"].rsplit("/", 1)[-1] for d in report["duplicates"]] == ["c.png", "c.png"]
