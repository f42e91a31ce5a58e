"""Evaluation sets: paired matching, missing partners, wrong scale, the crop protocol, seeded degradation."""

import numpy as np
import pytest
from PIL import Image

from consissr.config import DegradeParams, EvalDatasetParams, EvaluateParams
from consissr.evaluation.datasets import build_set, paired_set


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def noise(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def paired_folders(tmp_path):
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    for i, name in enumerate(["a", "b"]):
        big = noise(4 * 40, 4 * 48, i)
        save(hr / f"{name}_HR.png", big)
        save(lr / f"{name}_LR4.png", big[::4, ::4])
    save(lr / "orphan_LR4.png", noise(40, 48, 7))                 # no HR partner
    save(hr / "lonely_HR.png", noise(160, 192, 8))                # no LR partner
    save(lr / "odd_LR4.png", noise(40, 48, 9))
    save(hr / "odd_HR.png", noise(3 * 40, 3 * 48, 9))             # x3, not x4
    save(lr / "small_LR4.png", noise(20, 20, 10))
    save(hr / "small_HR.png", noise(80, 80, 10))                  # x4 but below the LR crop
    (lr / "broken_LR4.png").write_bytes(b"not a png")              # unreadable
    save(hr / "broken_HR.png", noise(160, 192, 11))
    return EvalDatasetParams(name="real", kind="paired", lr=str(lr), hr=str(hr), lr_suffix="_LR4", hr_suffix="_HR")


def test_paired_matching_and_each_skip_reason(tmp_path):
    entry = paired_folders(tmp_path)
    s = paired_set(entry, lr_crop=32, scale=4)
    assert [i.id for i in s.items] == ["a", "b"]
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in ((x["path"], x["reason"]) for x in s.skipped)}
    assert set(reasons) == {"orphan_LR4.png", "lonely_HR.png", "odd_HR.png", "small_LR4.png", "broken_HR.png"}
    assert "broken_LR4.png" in reasons["broken_HR.png"]  # the reader's message names the bad file
    assert "no HR partner" in reasons["orphan_LR4.png"]
    assert "no LR partner" in reasons["lonely_HR.png"]
    assert "not 4x the LR size 48x40" in reasons["odd_HR.png"]
    assert "smaller than evaluate.lr_crop 32" in reasons["small_LR4.png"]


def test_paired_centre_crop_protocol(tmp_path):
    entry = paired_folders(tmp_path)
    item = paired_set(entry, lr_crop=32, scale=4).items[0]
    lq, hq = item.load()
    assert lq.shape == (32, 32, 3) and hq.shape == (128, 128, 3)
    big = noise(160, 192, 0)
    # LR 48x40: centre box top (40-32)//2 = 4, left (48-32)//2 = 8; HR box = the same box x4
    np.testing.assert_array_equal(hq, big[16:144, 32:160])
    np.testing.assert_array_equal(lq, big[::4, ::4][4:36, 8:40])
    np.testing.assert_array_equal(lq, hq[::4, ::4])  # the pair stays aligned


def test_paired_needs_both_folders():
    with pytest.raises(ValueError, match="needs both"):
        paired_set(EvalDatasetParams(name="x", kind="paired", lr="somewhere"), lr_crop=32, scale=4)


def test_synthetic_crops_are_seeded_and_x4(tmp_path):
    import skimage.data
    save(tmp_path / "hr" / "rocket.png", skimage.data.rocket())
    save(tmp_path / "hr" / "tiny.png", noise(50, 50, 1))
    entry = EvalDatasetParams(name="div", kind="synthetic", hr=str(tmp_path / "hr"), count=3)
    ev = EvaluateParams(lr_crop=24)
    a, b = (build_set(entry, ev, DegradeParams(), seed=3) for _ in range(2))
    assert len(a.items) == 3 and [i["path"].endswith("tiny.png") for i in a.skipped] == [True]
    for x, y in zip(a.items, b.items):
        (lq1, hq1), (lq2, hq2) = x.load(), y.load()
        assert lq1.shape == (24, 24, 3) and hq1.shape == (96, 96, 3)
        np.testing.assert_array_equal(lq1, lq2)
        np.testing.assert_array_equal(hq1, hq2)
    assert len({i.id for i in a.items}) == 3
    other = build_set(entry, ev, DegradeParams(), seed=4)
    assert not np.array_equal(other.items[0].load()[0], a.items[0].load()[0])


def test_embedded_set_uses_only_held_out_photos():
    s = build_set(EvalDatasetParams(name="embedded", kind="embedded", count=4), EvaluateParams(lr_crop=24),
                  DegradeParams(), seed=0)
    assert [i.id.rsplit("_c", 1)[0] for i in s.items] == ["embedded_chelsea", "embedded_coffee"] * 2
    lq, hq = s.items[0].load()
    assert lq.shape == (24, 24, 3) and hq.dtype == np.uint8


def test_crop_below_what_degrade_can_handle_is_refused():
    with pytest.raises(ValueError, match="below the smallest size"):
        build_set(EvalDatasetParams(name="e", kind="embedded"), EvaluateParams(lr_crop=8), DegradeParams(), seed=0)


def test_stablesr_layout_same_names_in_both_folders(tmp_path):
    """StableSR's released RealSR/DRealSR crops: test_HR/ and test_LR/ hold identical file names, 512² and
    128², evaluated whole (lr_crop 128 = the whole LR image)."""
    for i, name in enumerate(["Canon_001_LR4.png", "sony_82_x1.png"]):
        big = noise(512, 512, i)
        save(tmp_path / "test_HR" / name, big)
        save(tmp_path / "test_LR" / name, big[::4, ::4])
    entry = EvalDatasetParams(name="RealSR", kind="paired", lr=str(tmp_path / "test_LR"), hr=str(tmp_path / "test_HR"))
    s = paired_set(entry, lr_crop=128, scale=4)
    assert [i.id for i in s.items] == ["Canon_001_LR4", "sony_82_x1"] and s.skipped == []
    lq, hq = s.items[1].load()
    np.testing.assert_array_equal(hq, noise(512, 512, 1))  # the whole HR crop, untouched
    assert lq.shape == (128, 128, 3)


def test_folder_outputs_by_id_whole_or_centre_cut(tmp_path):
    from consissr.config import EvalFolderParams
    from consissr.errors import InputError
    from consissr.evaluation.datasets import folder_outputs, read_folder_output

    out = tmp_path / "results"
    save(out / "a_out.png", noise(128, 128, 1))           # the evaluated HQ size
    full = noise(160, 192, 2)
    save(out / "b_out.png", full)                         # x4 the whole 48x40 LR image
    save(out / "c_out.png", noise(100, 100, 3))           # neither
    save(out / "metrics" / "d_out.png", noise(128, 128, 4))  # in a sub-folder: not an output of the folder
    skipped = []
    files = folder_outputs(EvalFolderParams(method="other", dataset="real", path=str(out), suffix="_out"),
                           ["a", "b", "c", "d"], skipped)
    assert sorted(files) == ["a", "b", "c"]
    assert skipped == [{"path": str(out / "d_out.*"), "method": "other", "reason": "no other output for pair d"}]
    whole_lr = (40, 48)
    np.testing.assert_array_equal(read_folder_output(files["a"], (128, 128, 3), lr_crop=32, scale=4,
                                                     lr_size=whole_lr), noise(128, 128, 1))
    # the same centre box as test_paired_centre_crop_protocol: LR top 4, left 8 → HR 16:144, 32:160
    np.testing.assert_array_equal(read_folder_output(files["b"], (128, 128, 3), lr_crop=32, scale=4,
                                                     lr_size=whole_lr), full[16:144, 32:160])
    with pytest.raises(InputError, match=r"c_out.png: size 100x100 is neither .* nor x4 the whole LR image \(48x40\)"):
        read_folder_output(files["c"], (128, 128, 3), lr_crop=32, scale=4, lr_size=whole_lr)
    with pytest.raises(InputError, match="b_out.png"):  # x4 another LR size (a padded input): misaligned, refused
        read_folder_output(files["b"], (128, 128, 3), lr_crop=32, scale=4, lr_size=(40, 40))
    with pytest.raises(InputError, match="b_out.png"):  # a synthetic set's crops are seeded: no cutting
        read_folder_output(files["b"], (128, 128, 3), lr_crop=32, scale=4, lr_size=None)


def test_folder_method_names_that_would_collide_are_refused():
    from consissr.config import EvalFolderParams
    from consissr.evaluation.stage import method_settings

    for bad in ("gan", "hq", "HQ", "../up", "a/b"):
        with pytest.raises(ValueError, match=r"folders\[0\].method"):
            method_settings(EvaluateParams(folders=(EvalFolderParams(method=bad, dataset="embedded", path="x"),)))
    twice = (EvalFolderParams(method="OSEDiff", dataset="embedded", path="x"),) * 2
    with pytest.raises(ValueError, match="named twice"):
        method_settings(EvaluateParams(folders=twice))
    assert list(method_settings(EvaluateParams(methods=("bicubic",), folders=twice[:1]))) == ["bicubic"]
