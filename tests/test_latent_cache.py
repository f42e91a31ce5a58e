"""Stage `encode`: sharded safetensors latents, atomic under a crash, and the streaming Dataset."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from consissr.config import params_from_dict
from consissr.data.latent_cache import LatentPairDataset, encode_pairs
from consissr.models.backbone import load_vae

N, SIZE = 7, 32


@pytest.fixture()
def pairs(tmp_path):
    """A prepared/ and degraded/ folder as the stages write them (made here, not by the stages)."""
    rng = np.random.default_rng(0)
    prepared, degraded = tmp_path / "prepared", tmp_path / "degraded"
    (prepared / "hq").mkdir(parents=True)
    (degraded / "lq_up").mkdir(parents=True)
    items = []
    for i in range(N):
        hq = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        lq = np.clip(hq.astype(int) + rng.integers(-30, 30, hq.shape), 0, 255).astype(np.uint8)
        Image.fromarray(hq).save(prepared / "hq" / f"img{i}.png")
        Image.fromarray(lq).save(degraded / "lq_up" / f"img{i}.png")
        items.append({"id": f"img{i}"})
    (degraded / "index.json").write_text(json.dumps({"items": items}))
    return prepared, degraded


def params(shard_size=3, **encode):
    p = params_from_dict({"encode": {"shard_size": shard_size, "batch_size": 2, **encode}})
    return {"encode": p.encode, "backbone": p.backbone, "device": "cpu"}


def shard_arrays(folder):
    out = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = {k: f.get_tensor(k) for k in f.keys()}
    return out


def test_encode_writes_scaled_latents_and_a_manifest(pairs, tiny_backbone, tmp_path):
    prepared, degraded = pairs
    manifest = encode_pairs(prepared, degraded, tmp_path / "lat", **params(), backbone_dir=tiny_backbone)
    assert manifest["count"] == N and [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    vae = load_vae(str(tiny_backbone))
    c, f = vae.config.latent_channels, 2 ** (len(vae.config.block_out_channels) - 1)
    assert manifest["latent_shape"] == [c, SIZE // f, SIZE // f] and manifest["dtype"] == "float32"
    assert json.loads((tmp_path / "lat" / "manifest.json").read_text()) == manifest
    ds = LatentPairDataset(tmp_path / "lat", verify=True)
    assert len(ds) == N and ds.ids == [f"img{i}" for i in range(N)]
    # the cached latent is exactly the scaled posterior mode of the VAE the backbone holds
    hq = np.asarray(Image.open(prepared / "hq" / "img4.png"), dtype=np.float32)
    x = torch.from_numpy(hq).permute(2, 0, 1)[None] / 127.5 - 1
    expected = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    sample = ds[4]
    assert sample["id"] == "img4"
    torch.testing.assert_close(sample["hq"], expected[0], rtol=1e-5, atol=1e-5)
    assert not torch.equal(sample["lq"], sample["hq"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)))
    assert batch["lq"].shape == (4, c, SIZE // f, SIZE // f)


def test_cpu_encode_one_image_at_a_time_writes_the_latents_of_the_whole_batch(tmp_path, tiny_backbone):
    # on CPU the stage's VAE encodes a batch image by image (memory per worker): at 128² and up the same
    # bytes as one call on the batch (at 32-64² oneDNN's kernels for the two shapes round differently)
    from consissr.data.parallel import one_thread

    rng = np.random.default_rng(1)
    prepared, degraded = tmp_path / "prepared", tmp_path / "degraded"
    (prepared / "hq").mkdir(parents=True)
    (degraded / "lq_up").mkdir(parents=True)
    hq = rng.integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    for i in range(3):
        Image.fromarray(hq[i]).save(prepared / "hq" / f"img{i}.png")
        Image.fromarray(hq[i][::-1].copy()).save(degraded / "lq_up" / f"img{i}.png")
    (degraded / "index.json").write_text(json.dumps({"items": [{"id": f"img{i}"} for i in range(3)]}))
    encode_pairs(prepared, degraded, tmp_path / "lat", **params(shard_size=3, batch_size=3), backbone_dir=tiny_backbone)
    with safe_open(str(tmp_path / "lat" / "shard-00000.safetensors"), framework="pt") as f:
        cached = f.get_tensor("hq")
    vae = load_vae(str(tiny_backbone)).eval()
    x = torch.from_numpy(hq).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with one_thread(), torch.no_grad():  # the stage's one thread; the batch of 3 in one encoder call
        whole = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    assert not vae.use_slicing and torch.equal(cached, whole)


def test_bad_pair_is_skipped_and_reported(pairs, tiny_backbone, tmp_path):
    prepared, degraded = pairs
    (degraded / "lq_up" / "img2.png").write_bytes(b"garbage")
    (prepared / "hq" / "img5.png").unlink()
    manifest = encode_pairs(prepared, degraded, tmp_path / "lat", **params(), backbone_dir=tiny_backbone)
    report = json.loads((tmp_path / "lat" / "report.json").read_text())
    reasons = {r["id"]: r["reason"] for r in report["skipped"]}
    assert set(reasons) == {"img2", "img5"} and "img5.png: missing" in reasons["img5"]
    assert "unreadable" in reasons["img2"] and manifest["count"] == N - 2


CRASH = textwrap.dedent("""
    import os, signal, sys
    import consissr.data.latent_cache as lc
    from consissr.config import params_from_dict
    real_save, calls = lc.save_file, []
    def save_then_die(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second shard: half a file on disk, then SIGKILL
            real_save(tensors, path, metadata=metadata)
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(tensors, path, metadata=metadata)
    lc.save_file = save_then_die
    p = params_from_dict({"encode": {"shard_size": 3, "batch_size": 2}})
    lc.encode_pairs(sys.argv[1], sys.argv[2], sys.argv[3], encode=p.encode, backbone=p.backbone,
                    device="cpu", backbone_dir=sys.argv[4])
""")


def test_killed_mid_write_leaves_no_readable_partial_shard_and_rerun_completes(pairs, tiny_backbone, tmp_path):
    prepared, degraded = pairs
    out = tmp_path / "lat"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(prepared), str(degraded), str(out), str(tiny_backbone)],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in out.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    assert len(list(out.glob(".shard-00001*"))) == 1  # the half-written temp file, under a temp name
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LatentPairDataset(out)
    shard_arrays(out)  # what is there under a final name reads cleanly

    encode_pairs(prepared, degraded, out, **params(), backbone_dir=tiny_backbone)
    report = json.loads((out / "report.json").read_text())
    assert report["shards_reused"] == 1 and not list(out.glob(".shard-*"))
    clean = tmp_path / "clean"
    encode_pairs(prepared, degraded, clean, **params(), backbone_dir=tiny_backbone)
    a, b = shard_arrays(out), shard_arrays(clean)
    assert a.keys() == b.keys() and all(torch.equal(a[k][t], b[k][t]) for k in a for t in ("lq", "hq"))
    assert len(LatentPairDataset(out, verify=True)) == N


def test_changed_params_rewrite_shards_and_drop_stale_ones(pairs, tiny_backbone, tmp_path):
    prepared, degraded = pairs
    out = tmp_path / "lat"
    encode_pairs(prepared, degraded, out, **params(shard_size=2), backbone_dir=tiny_backbone)
    assert len(list(out.glob("shard-*.safetensors"))) == 4
    encode_pairs(prepared, degraded, out, **params(shard_size=4, dtype="bfloat16"), backbone_dir=tiny_backbone)
    assert json.loads((out / "report.json").read_text())["shards_reused"] == 0
    assert len(list(out.glob("shard-*.safetensors"))) == 2
    assert LatentPairDataset(out)[0]["hq"].dtype == torch.bfloat16


def test_missing_embedded_backbone_says_how_to_build_it(pairs, tmp_path):
    prepared, degraded = pairs
    with pytest.raises(FileNotFoundError, match="consissr backbone"):
        encode_pairs(prepared, degraded, tmp_path / "lat", **params(), backbone_dir=tmp_path / "nothing")


def test_same_inputs_give_byte_identical_shards(pairs, tiny_backbone, tmp_path):
    """DVC hashes the cache: re-encoding the same pairs must reproduce every byte."""
    prepared, degraded = pairs
    for name in ("a", "b"):
        encode_pairs(prepared, degraded, tmp_path / name, **params(shard_size=1), backbone_dir=tiny_backbone)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == N + 2  # shards, manifest.json, report.json
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_changed_images_are_re_encoded_not_reused(pairs, tiny_backbone, tmp_path):
    prepared, degraded = pairs
    out = tmp_path / "lat"
    encode_pairs(prepared, degraded, out, **params(), backbone_dir=tiny_backbone)
    before = LatentPairDataset(out)[4]["lq"].clone()
    img = degraded / "lq_up" / "img4.png"
    Image.fromarray(255 - np.asarray(Image.open(img))).save(img)  # a new degradation of one image
    encode_pairs(prepared, degraded, out, **params(), backbone_dir=tiny_backbone)
    report = json.loads((out / "report.json").read_text())
    assert report["shards_reused"] == 2  # img4 sits in the second of three shards
    assert not torch.equal(LatentPairDataset(out)[4]["lq"], before)


def test_a_crop_of_another_size_is_skipped(pairs, tiny_backbone, tmp_path):
    prepared, degraded = pairs
    odd = np.zeros((SIZE * 2, SIZE * 2, 3), np.uint8)
    Image.fromarray(odd).save(prepared / "hq" / "img3.png")
    Image.fromarray(odd).save(degraded / "lq_up" / "img3.png")
    manifest = encode_pairs(prepared, degraded, tmp_path / "lat", **params(), backbone_dir=tiny_backbone)
    report = json.loads((tmp_path / "lat" / "report.json").read_text())
    assert [r["id"] for r in report["skipped"]] == ["img3"] and "one crop_size per cache" in report["skipped"][0]["reason"]
    assert manifest["count"] == N - 1
