"""Stage ``encode``: LQ/HQ pairs → scaled VAE latents in safetensors shards, and the Dataset.

    z = vae.encode(x).latent_dist.mode() · scaling_factor,  x ∈ [-1, 1]   (deterministic: the posterior mean)

``data/latents/`` holds ``shard-XXXXX.safetensors`` ("lq", "hq": (N, C, h, w); ids and params
hash in the metadata), ``manifest.json`` (written last) and ``report.json``. LQ is
``degraded/lq_up`` (the LQ image at HQ size). Shards are written atomically; a rerun keeps the
complete shards whose pairs and params match. ``LatentPairDataset`` refuses a folder without a manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from consissr.config import section_hash
from consissr.data import layout
from consissr.errors import InputError, MissingInputError
from consissr.io import atomic_path, file_sha256, write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)




def _read_pair(prepared: Path, degraded: Path, item_id: str) -> tuple[np.ndarray, np.ndarray, str]:
    hq_path = layout.image_path(prepared, layout.HQ, item_id)
    lq_path = layout.image_path(degraded, layout.LQ_UP, item_id)
    hq, lq = layout.read_rgb_array(hq_path), layout.read_rgb_array(lq_path)
    if hq.shape != lq.shape:
        raise InputError(f"{lq_path}: size {lq.shape[:2]} differs from HQ {hq.shape[:2]}")
    digest = hashlib.sha256(file_sha256(hq_path).encode() + file_sha256(lq_path).encode()).hexdigest()
    return hq, lq, digest


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


def _shard_chunks(prepared: Path, degraded: Path, ids: list[str], size: int, skipped: list, bar):
    """Readable pairs in index order, ``size`` at a time; unreadable or odd-sized ones are skipped."""
    chunk, shape = [], None
    for item_id in ids:
        bar.update(1)
        try:
            hq, lq, digest = _read_pair(prepared, degraded, item_id)
            if shape is not None and hq.shape != shape:
                raise InputError(f"{layout.image_path(prepared, layout.HQ, item_id)}: size {hq.shape[:2]} "
                                 f"differs from the cache's {shape[:2]}; one crop_size per cache")
        except (InputError, MissingInputError) as exc:
            log.warning("skip %s", exc)
            skipped.append({"id": item_id, "reason": str(exc)})
            continue
        shape = hq.shape
        chunk.append((item_id, hq, lq, digest))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_pairs(prepared_dir, degraded_dir, out_dir, *, encode, backbone, device: str = "auto",
                 backbone_dir="data/models/backbone") -> dict:
    """Encode every pair listed in ``degraded_dir/index.json``; return the manifest.

    ``encode`` and ``backbone`` are ``config.EncodeParams`` and ``config.BackboneParams``.
    """
    from consissr.models.backbone import load_vae, resolve_source

    prepared, degraded, out = Path(prepared_dir), Path(degraded_dir), Path(out_dir)
    index_path = degraded / layout.INDEX
    ids = layout.read_ids(degraded, written_by="degrade")
    p = encode
    device = resolve_device(device)
    dtype = _DTYPES[p.dtype]
    source = resolve_source(backbone.pretrained, backbone_dir)
    vae = load_vae(source, revision=backbone.revision, torch_dtype=dtype).to(device).eval()
    params_hash = section_hash(backbone, encode)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is the commit record: gone until done
    for leftover in out.glob(".shard-*"):  # temp files of a run that was killed mid-write
        leftover.unlink()

    # one shard at a time: read and check its pairs, reuse it if an earlier run wrote exactly
    # these pairs with these params, else encode and write it (memory: one shard of pixels)
    skipped: list[dict] = []
    shards, reused, count, image_shape = [], 0, 0, None
    bar = tqdm(total=len(ids), desc="encode", unit="pair")
    for chunk in _shard_chunks(prepared, degraded, ids, p.shard_size, skipped, bar):
        chunk_ids = [c[0] for c in chunk]
        image_shape = image_shape or list(chunk[0][1].shape)
        sources = hashlib.sha256("".join(c[3] for c in chunk).encode()).hexdigest()
        path = out / f"shard-{len(shards):05d}.safetensors"
        if path.exists() and _shard_ok(path, chunk_ids, params_hash, sources):
            reused += 1
        else:
            lq_lat, hq_lat = [], []
            for b in range(0, len(chunk), p.batch_size):
                part = chunk[b:b + p.batch_size]
                hq_lat.append(encode_latents(vae, _to_model([c[1] for c in part], device, dtype)).cpu())
                lq_lat.append(encode_latents(vae, _to_model([c[2] for c in part], device, dtype)).cpu())
            tensors = {"lq": torch.cat(lq_lat).contiguous(), "hq": torch.cat(hq_lat).contiguous()}
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata=_meta(chunk_ids, params_hash, sources))
        shards.append({"file": path.name, "count": len(chunk), "sha256": file_sha256(path),
                       "sources_sha256": sources})
        count += len(chunk)
    bar.close()
    if not shards:
        raise InputError(f"encode: none of the {len(ids)} pairs listed in {index_path} could be read")
    for stale in sorted(out.glob("shard-*.safetensors"))[len(shards):]:
        stale.unlink()

    with safe_open(str(out / shards[0]["file"]), framework="pt") as f:
        latent_shape = list(f.get_slice("hq").get_shape()[1:])
    manifest = {
        "count": count, "latent_shape": latent_shape, "image_shape": image_shape,
        "dtype": p.dtype, "scaling_factor": float(vae.config.scaling_factor), "backbone": source,
        "params_hash": params_hash, "shards": shards, "skipped": len(skipped),
    }
    write_json(out / layout.REPORT, {"encoded": count, "shards_reused": reused, "skipped": skipped})
    write_json(out / MANIFEST, manifest)
    log.info("encode: %d pairs in %d shards (%d reused), latent %s, %d skipped",
             count, len(shards), reused, latent_shape, len(skipped))
    return manifest


class LatentPairDataset(Dataset):
    """Streams (LQ latent, HQ latent, id) from the shards a finished ``encode`` wrote."""

    written_by = "encode"  # the stage that writes this cache (named when its manifest is missing)

    def __init__(self, root: str | Path, *, verify: bool = False):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise MissingInputError(f"{manifest_path}: missing: the cache is incomplete; rerun `consissr {self.written_by}`")
        self.manifest = json.loads(manifest_path.read_text())
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
        s, row = self._index[i]
        f = self._shard(s)
        return {"lq": f.get_slice("lq")[row], "hq": f.get_slice("hq")[row], "id": self.ids[i]}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state
