"""Stage ``encode``: LQ/HQ pairs → scaled VAE latents in safetensors shards, and the Dataset.

    z = vae.encode(x).latent_dist.mode() · scaling_factor,  x ∈ [-1, 1]   (deterministic: the posterior mean)

``data/latents/`` holds ``shard-XXXXX.safetensors`` ("lq", "hq": (N, C, h, w), plus "lq_v<k>" per
further degradation variant; ids and params hash in the metadata), ``manifest.json`` (written
last) and ``report.json``. LQ is ``degraded/lq_up`` (the LQ image at HQ size). Shards run on
``parallel``'s Dask cluster and are written atomically; a rerun keeps the complete shards whose
pairs and params match. ``LatentPairDataset`` refuses a folder without a manifest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from consissr.config import ParallelParams, section_hash
from consissr.data import layout
from consissr.data.parallel import run_shards, split
from consissr.errors import InputError, MissingInputError
from consissr.io import atomic_path, file_sha256, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)




def _file_digest(*paths: Path) -> str:
    return hashlib.sha256(b"".join(file_sha256(p).encode() for p in paths)).hexdigest()


def _read_pair(prepared: Path, degraded: Path, item_id: str, variants: int = 1
               ) -> tuple[np.ndarray, list[np.ndarray], str]:
    """HQ crop, its ``variants`` LQ images (``lq_up``) and a hash of their files."""
    hq_path = layout.image_path(prepared, layout.HQ, item_id)
    lq_paths = [layout.image_path(layout.variant_dir(degraded, v), layout.LQ_UP, item_id) for v in range(variants)]
    hq = layout.read_rgb_array(hq_path)
    lqs = [layout.read_rgb_array(path) for path in lq_paths]
    for path, lq in zip(lq_paths, lqs):
        if hq.shape != lq.shape:
            raise InputError(f"{path}: size {lq.shape[:2]} differs from HQ {hq.shape[:2]}")
    return hq, lqs, _file_digest(hq_path, *lq_paths)


def _to_model(batch: list[np.ndarray], device, dtype) -> torch.Tensor:
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.to(device=device, dtype=dtype)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents of images in [-1, 1] (SD convention: posterior mode x scaling_factor)."""
    return vae.encode(images).latent_dist.mode() * vae.config.scaling_factor


def _meta(ids: list[str], params_hash: str, sources: str) -> dict[str, str]:
    # ONE metadata key: safetensors writes its metadata map in hash order, so with two keys
    # the same shard could come out as different bytes (and a different DVC hash) each run
    return {"consissr": json.dumps({"ids": ids, "params_hash": params_hash, "sources": sources}, sort_keys=True)}


def _shard_meta(f) -> dict:
    return json.loads((f.metadata() or {}).get("consissr", "{}"))


def _shard_ok(path: Path, ids: list[str], params_hash: str, sources: str) -> bool:
    """A shard an earlier run completed from exactly these pairs (ids and file hashes) and params."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return _shard_meta(f) == {"ids": ids, "params_hash": params_hash, "sources": sources}
    except Exception:  # noqa: BLE001 - any unreadable file is simply rewritten
        return False


def lq_key(variant: int) -> str:
    """The shard tensor of degradation variant ``variant``: ``lq`` (0), ``lq_v<k>``."""
    return "lq" if variant == 0 else f"lq_v{variant}"


_VAE: dict[tuple, torch.nn.Module] = {}  # this process's VAE: a Dask worker loads it once for all its shards


def _load_vae(source: str, revision: str | None, dtype: str, device: str) -> torch.nn.Module:
    from consissr.models.backbone import load_vae

    key = (source, revision, dtype, device)
    if key not in _VAE:
        _VAE.clear()
        vae = load_vae(source, revision=revision, torch_dtype=_DTYPES[dtype]).to(resolve_device(device)).eval()
        if resolve_device(device).type == "cpu":
            # diffusers' sliced encode: one image of the batch at a time through the encoder. A worker
            # (one thread) was not faster on the whole batch, whose activations were most of its memory
            # (benchmarks/README.md, "Data stages at scale"); from 128² up, the latents are the same bytes
            vae.enable_slicing()
        _VAE[key] = vae
    return _VAE[key]


def _encode_shard(shard: tuple[int, list[str]], *, prepared: Path, degraded: Path, out: Path, p, source: str,
                  revision: str | None, device: str, params_hash: str, shape: tuple, variants: int) -> dict:
    """Read, check and encode one shard of ids into ``out/shard-<k>.safetensors`` (unless an earlier run
    wrote exactly these pairs); return its manifest row, skips and whether it was reused."""
    k, ids = shard
    skipped, chunk = [], []
    for item_id in ids:
        try:
            hq, lqs, digest = _read_pair(prepared, degraded, item_id, variants)
            if hq.shape != shape:
                raise InputError(f"{layout.image_path(prepared, layout.HQ, item_id)}: size {hq.shape[:2]} "
                                 f"differs from the cache's {shape[:2]}; one crop_size per cache")
        except (InputError, MissingInputError) as exc:
            log.warning("skip %s", exc)
            skipped.append({"id": item_id, "reason": str(exc)})
            continue
        chunk.append((item_id, hq, lqs, digest))
    if not chunk:
        return {"row": None, "skipped": skipped, "reused": False}
    chunk_ids = [c[0] for c in chunk]
    sources = hashlib.sha256("".join(c[3] for c in chunk).encode()).hexdigest()
    path = out / f"shard-{k:05d}.safetensors"
    reused = path.exists() and _shard_ok(path, chunk_ids, params_hash, sources)
    if not reused:
        vae = _load_vae(source, revision, p.dtype, device)
        weight = next(vae.parameters())
        hq_lat, lq_lat = [], [[] for _ in range(variants)]
        for b in range(0, len(chunk), p.batch_size):
            part = chunk[b:b + p.batch_size]
            hq_lat.append(encode_latents(vae, _to_model([c[1] for c in part], weight.device, weight.dtype)).cpu())
            for v in range(variants):
                lq_lat[v].append(encode_latents(vae, _to_model([c[2][v] for c in part], weight.device,
                                                               weight.dtype)).cpu())
        tensors = {lq_key(v): torch.cat(lq_lat[v]).contiguous() for v in range(variants)}
        tensors["hq"] = torch.cat(hq_lat).contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=_meta(chunk_ids, params_hash, sources))
    row = {"file": path.name, "count": len(chunk), "sha256": file_sha256(path), "sources_sha256": sources}
    return {"row": row, "skipped": skipped, "reused": reused}


def _cache_shape(prepared: Path, degraded: Path, ids: list[str], variants: int) -> tuple | None:
    """The image shape of the first readable pair: every pair of the cache must have it."""
    for item_id in ids:
        try:
            return _read_pair(prepared, degraded, item_id, variants)[0].shape
        except (InputError, MissingInputError):
            continue
    return None


def encode_pairs(prepared_dir, degraded_dir, out_dir, *, encode, backbone, device: str = "auto",
                 backbone_dir="data/models/backbone", parallel: ParallelParams | None = None) -> dict:
    """Encode every pair listed in ``degraded_dir/index.json`` (each degradation variant); return the manifest.

    ``encode``, ``backbone`` and ``parallel`` are ``config.EncodeParams``, ``BackboneParams`` and
    ``ParallelParams``. Shard ``k`` holds the readable pairs of the ``k``-th ``shard_size`` ids
    of the index, whoever encodes it, so the cache is the same for any number of workers.
    """
    from consissr.models.backbone import load_vae_config, resolve_source

    prepared, degraded, out = Path(prepared_dir), Path(degraded_dir), Path(out_dir)
    parallel = parallel or ParallelParams()
    index_path = degraded / layout.INDEX
    ids = layout.read_ids(degraded, written_by="degrade")
    variants = layout.read_variants(degraded)
    p = encode
    source = resolve_source(backbone.pretrained, backbone_dir)
    vae_config = load_vae_config(source, revision=backbone.revision)
    params_hash = section_hash(backbone, encode)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is the commit record: gone until done
    for leftover in out.glob(".shard-*"):  # temp files of a run that was killed mid-write
        leftover.unlink()
    shape = _cache_shape(prepared, degraded, ids, variants)
    if shape is None:
        raise InputError(f"encode: none of the {len(ids)} pairs listed in {index_path} could be read")

    # shard by shard (memory: one shard of pixels per worker): read and check its pairs, reuse it if
    # an earlier run wrote exactly these pairs with these params, else encode and write it
    fn = functools.partial(_encode_shard, prepared=prepared, degraded=degraded, out=out, p=p, source=source,
                           revision=backbone.revision, device=device, params_hash=params_hash, shape=shape,
                           variants=variants)
    try:
        recs = run_shards(fn, list(enumerate(split(ids, p.shard_size))), parallel, desc="encode")
    finally:
        _VAE.clear()
    shards = [r["row"] for r in recs if r["row"] is not None]
    skipped = [s for r in recs for s in r["skipped"]]
    reused = sum(r["reused"] for r in recs)
    count = sum(s["count"] for s in shards)
    if not shards:
        raise InputError(f"encode: none of the {len(ids)} pairs listed in {index_path} could be read")
    keep = {s["file"] for s in shards}
    for stale in out.glob("shard-*.safetensors"):
        if stale.name not in keep:
            stale.unlink()

    with safe_open(str(out / shards[0]["file"]), framework="pt") as f:
        latent_shape = list(f.get_slice("hq").get_shape()[1:])
    manifest = {
        "count": count, "latent_shape": latent_shape, "image_shape": list(shape),
        "dtype": p.dtype, "scaling_factor": float(vae_config["scaling_factor"]), "backbone": source,
        "params_hash": params_hash, "shards": shards, "skipped": len(skipped),
    }
    if variants > 1:  # K = 1 keeps the earlier manifest bytes
        manifest["variants"] = variants
    write_json(out / layout.REPORT, {"encoded": count, "shards_reused": reused, "skipped": skipped})
    write_json(out / MANIFEST, manifest)
    log.info("encode: %d pairs x %d variants in %d shards (%d reused), latent %s, %d skipped",
             count, variants, len(shards), reused, latent_shape, len(skipped))
    return manifest


class LatentPairDataset(Dataset):
    """Streams (LQ latent, HQ latent, id) from the shards a finished ``encode`` wrote.

    Item ``i`` holds degradation variant 0; ``item(i, variant)`` any of the ``variants`` cached.
    """

    written_by = "encode"  # the stage that writes this cache (named when its manifest is missing)

    def __init__(self, root: str | Path, *, verify: bool = False):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise MissingInputError(f"{manifest_path}: missing: the cache is incomplete; rerun `consissr {self.written_by}`")
        self.manifest = json.loads(manifest_path.read_text())
        self.variants = int(self.manifest.get("variants", 1))
        self._index: list[tuple[int, int]] = []
        self.ids: list[str] = []
        for s, shard in enumerate(self.manifest["shards"]):
            path = self.root / shard["file"]
            if verify and file_sha256(path) != shard["sha256"]:
                raise InputError(f"{path}: checksum differs from {manifest_path}")
            with safe_open(str(path), framework="pt") as f:
                self.ids += _shard_meta(f)["ids"]
            self._index += [(s, i) for i in range(shard["count"])]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self._index)

    def _shard(self, s: int):
        if s not in self._handles:  # opened lazily, per worker process
            self._handles[s] = safe_open(str(self.root / self.manifest["shards"][s]["file"]), framework="pt")
        return self._handles[s]

    def __getitem__(self, i: int) -> dict:
        return self.item(i)

    def item(self, i: int, variant: int = 0) -> dict:
        if not 0 <= variant < self.variants:
            raise IndexError(f"variant {variant} of a cache with {self.variants} degradation variants")
        s, row = self._index[i]
        f = self._shard(s)
        return {"lq": f.get_slice(lq_key(variant))[row], "hq": f.get_slice("hq")[row], "id": self.ids[i]}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
