"""Paper-scale data stages: centre crops, train_clip's own pair set, Dask shards, degradation variants."""

import json
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from consissr.config import DegradeParams, ParallelParams, PrepareParams, params_from_dict
from consissr.data.degradation import degrade_folder
from consissr.data.latent_cache import LatentPairDataset, encode_pairs
from consissr.data.parallel import local_cluster
from consissr.data.sources import prepare
from consissr.errors import ParamsError
from consissr.training.loop import StreamBatchSampler
from consissr.training.sdsr_stage import SdsrDataset, draw_variant


def photo(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def folder_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_center_mode_resizes_the_short_side_then_cuts_the_centre(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    wide, small = photo(48, 64, 0), photo(20, 30, 1)
    Image.fromarray(wide).save(src / "wide.png")
    Image.fromarray(small).save(src / "small.png")
    report = prepare(PrepareParams(sources=(str(src),), crop_size=32, crops_per_image=1, crop_mode="center"),
                     out_dir=tmp_path / "out", seed=0)
    assert report["images_used"] == 2 and report["skipped"] == []  # the small one is enlarged, not dropped
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    items = {i["source"]: i for i in index["items"]}
    assert index["crop_mode"] == "center"
    # wide: 64x48 -> short side 32 -> 43x32 (PIL bicubic), centre columns 5..37
    expected = np.asarray(Image.fromarray(wide).resize((43, 32), Image.Resampling.BICUBIC))[:, 5:37]
    got = np.asarray(Image.open(tmp_path / "out" / "hq" / f"{items['wide.png']['id']}.png"))
    assert np.array_equal(got, expected) and items["wide.png"]["box"] == [5, 0, 32, 32]
    assert items["small.png"]["resized"] == [48, 32]
    with pytest.raises(ParamsError, match="crops_per_image.*center"):
        params_from_dict({"prepare": {"crop_mode": "center", "crops_per_image": 2}})


def test_clip_pair_set_is_prepared_degraded_and_read_by_train_clip(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(photo(100, 120, i)).save(src / f"{i}.png")
    p = PrepareParams(sources=(str(src),), crop_size=96, crops_per_image=2, clip_crop_size=80)
    report = prepare(p, out_dir=tmp_path / "prepared", seed=0)
    assert report["crops_written"] == 4 and report["clip_crops_written"] == 2
    degrade_folder(tmp_path / "prepared", tmp_path / "degraded", DegradeParams(), seed=0)
    clip_items = json.loads((tmp_path / "degraded" / "clip" / "index.json").read_text())["items"]
    assert [(i["hq_size"], i["lq_size"]) for i in clip_items] == [([80, 80], [20, 20])] * 2  # degraded at 80, not 96

    import consissr.training.clip_stage as clip_stage

    seen = {}

    class Stop(Exception):
        pass

    def record(prepared, degraded, **_):
        seen.update(prepared=prepared, degraded=degraded)
        raise Stop

    monkeypatch.setattr(clip_stage, "PairedImageDataset", record)
    with pytest.raises(Stop):
        clip_stage.train_clip(tmp_path / "prepared", tmp_path / "degraded", tmp_path / "clip_model",
                              clip=params_from_dict({}).clip, train=params_from_dict({}).train_clip, seed=0)
    assert seen == {"prepared": tmp_path / "prepared" / "clip", "degraded": tmp_path / "degraded" / "clip"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_backbone):
    """prepare → degrade (3 variants) → encode, in this process and on a Dask cluster of 2 worker processes."""

    root = tmp_path_factory.mktemp("scale")
    src = root / "src"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo(88, 100, 10 + i)).save(src / f"{i}.png")
    p = params_from_dict({"prepare": {"sources": [str(src)], "crop_size": 80, "crops_per_image": 2},
                          "degrade": {"variants": 3}, "encode": {"shard_size": 2, "batch_size": 2}})

    def run(name, parallel):
        out = root / name
        prepare(p.prepare, out_dir=out / "prepared", seed=5, parallel=parallel)
        degrade_folder(out / "prepared", out / "degraded", p.degrade, seed=5, parallel=parallel)
        encode_pairs(out / "prepared", out / "degraded", out / "latents", encode=p.encode, backbone=p.backbone,
                     device="cpu", backbone_dir=tiny_backbone, parallel=parallel)
        return out

    runs = {"one": run("one", ParallelParams(workers=1))}
    # one cluster for the three stages (a start costs seconds), reached as a remote scheduler is
    with local_cluster(2) as cluster:
        runs["two"] = run("two", ParallelParams(workers=2, scheduler_address=cluster.scheduler_address))
    single = params_from_dict({"degrade": {"variants": 1}}).degrade
    degrade_folder(runs["one"] / "prepared", root / "k1", single, seed=5)
    return runs, root / "k1"


def _malloc_trim_threshold():
    import os
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def test_the_stages_workers_run_with_glibc_default_malloc(monkeypatch):
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 (distributed.yaml, nanny.pre-spawn-environ), which
    # made degrade 32% slower (parallel.local_cluster); a plain LocalCluster's worker has it
    from dask.distributed import Client

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "")  # so that monkeypatch restores the variable's absence:
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")      # a Dask nanny also sets it in its own process
    with local_cluster(1) as cluster, Client(cluster) as client:
        assert list(client.run(_malloc_trim_threshold).values()) == [None]


def test_one_and_two_workers_write_the_same_bytes(two_runs):
    (runs, _) = two_runs
    one, two = folder_bytes(runs["one"]), folder_bytes(runs["two"])
    assert sorted(one) == sorted(two)
    assert len([k for k in one if k.startswith("latents/shard-")]) == 3  # 6 crops, 2 per shard
    index_one, index_two = (json.loads(run.pop("degraded/index.json")) for run in (one, two))
    assert index_one.pop("hq_dir").endswith("one/prepared") and index_two.pop("hq_dir").endswith("two/prepared")
    assert index_one == index_two  # the rest of the index: ids, seeds, variants, params
    assert [k for k in one if one[k] != two[k]] == []


def test_variants_differ_their_first_is_the_single_degradation_and_all_are_drawn(two_runs):
    runs, k1 = two_runs
    degraded = runs["one"] / "degraded"
    items = json.loads((degraded / "index.json").read_text())["items"]
    for item in items:
        lqs = [(degraded / p).read_bytes() for p in [item["lq_up"]] + [v["lq_up"] for v in item["variants"]]]
        assert len(set(lqs)) == 3, item["id"]  # 3 independently seeded degradations
        assert lqs[0] == (k1 / "lq_up" / f"{item['id']}.png").read_bytes()  # variant 0 = degrade.variants 1
    latents = LatentPairDataset(runs["one"] / "latents")
    assert latents.variants == 3 and len(latents) == 6
    n, k = len(latents), latents.variants
    embeds = torch.arange(k * n, dtype=torch.float32).view(k, n, 1)  # row (v, i) holds v·n + i
    dataset = SdsrDataset(latents, embeds, torch.zeros(n, dtype=torch.long), seed=3)
    sampler = StreamBatchSampler(n, seed=3, cursor=0, batch_size=3, rank=0, world=1,
                                 epoch_indexed=dataset.epoch_indexed)
    drawn = defaultdict(set)
    batches = iter(sampler)
    for _ in range(3 * n // 3):  # 3 epochs: each sample sees its 3 variants once, in a seeded order
        for index in next(batches):
            item = dataset[index]
            epoch, i = divmod(index, n)
            v = int(item["image_embeds"].item()) // n
            assert v == draw_variant(3, epoch, i, k) and int(item["image_embeds"].item()) % n == i
            assert torch.equal(item["lq"], latents.item(i, v)["lq"])
            drawn[i].add(v)
    assert all(drawn[i] == {0, 1, 2} for i in range(n)), dict(drawn)
    assert not torch.equal(latents.item(0, 0)["lq"], latents.item(0, 1)["lq"])


def _where(x):
    import os

    return x, os.getpid(), torch.get_num_threads()


def test_run_shards_on_a_local_cluster_keeps_shard_order_one_thread_each():
    import os

    from consissr.data.parallel import run_shards

    out = run_shards(_where, list(range(6)), ParallelParams(workers=2), desc="test")
    assert [x for x, _, _ in out] == list(range(6))
    assert {threads for _, _, threads in out} == {1} and os.getpid() not in {pid for _, pid, _ in out}
    assert run_shards(_where, [7], ParallelParams(workers=1), desc="test")[0][1] == os.getpid()  # in-process
