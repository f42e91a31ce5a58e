"""Stage ``embed_clip``: robust CLIP student embeddings of the LQ images, sharded beside the latents.

    e_i = E'(I_LQ,i)   (the frozen student of Eq. 3; train_sdsr's image prompt, §3.3)

``data/embeddings/`` mirrors ``data/latents/``: ``shard-XXXXX.safetensors`` holds ``"image_embeds"``
(N, D) for exactly the ids of the latent shard with the same name, plus ``manifest.json`` (written
last) and ``report.json``. Shards, metadata, reuse on rerun and the manifest follow
``latent_cache`` (its helpers, not a copy). ``ImageEmbeddingCache`` reads one row per item lazily,
so no process holds the (N, D) table (ImageNet with ViT-H-14: about 5 GB of float32).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from consissr.config import EmbedClipParams, section_hash
from consissr.data import layout
from consissr.data.latent_cache import (
    _DTYPES,
    MANIFEST,
    LatentPairDataset,
    _meta,
    _shard_ok,
    resolve_device,
)
from consissr.errors import InputError
from consissr.io import atomic_path, file_sha256, write_json

log = logging.getLogger(__name__)

EMBEDS = "image_embeds"
LQ_PIXELS = layout.LQ_UP  # the CLIP input: the LQ image at HQ size, as train_clip's student sees it


@torch.no_grad()
def robust_clip_embeddings(clip, lq_dir: str | os.PathLike, ids: Sequence[str], *,
                           device: torch.device, batch_size: int = 32) -> torch.Tensor:
    """E'(I_LQ) of ``lq_dir/<id>.png`` for every id, (N, D) float32 on CPU, in ``ids`` order."""
    lq_dir = Path(lq_dir)
    clip.to(device).eval()
    out = []
    for start in range(0, len(ids), batch_size):
        images = torch.stack([layout.read_rgb(lq_dir / f"{i}.png") for i in ids[start:start + batch_size]])
        out.append(clip.student_embeds(images.to(device)).float().cpu())
    return torch.cat(out)


def embed_lq_images(latents_dir, degraded_dir, robust_clip_dir, out_dir, *, embed: EmbedClipParams,
                    device: str = "auto") -> dict:
    """Write the student embedding of every item of the latent cache, shard for shard; return the manifest."""
    from consissr.models.robust_clip import WEIGHTS_NAME, RobustCLIP

    latents_dir, degraded, out = Path(latents_dir), Path(degraded_dir), Path(out_dir)
    latents = LatentPairDataset(latents_dir)
    clip_sha = file_sha256(Path(robust_clip_dir) / WEIGHTS_NAME)
    dtype = _DTYPES[embed.dtype]
    clip = RobustCLIP.from_pretrained(robust_clip_dir, device=resolve_device(device), dtype=dtype)
    clip.requires_grad_(False)
    params_hash = section_hash(embed)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is the commit record: gone until done
    for leftover in out.glob(".shard-*"):
        leftover.unlink()

    shards, reused, start = [], 0, 0
    bar = tqdm(total=len(latents), desc="embed_clip", unit="image")
    for shard in latents.manifest["shards"]:
        ids = latents.ids[start:start + shard["count"]]
        start += shard["count"]
        lq_files = [layout.image_path(degraded, LQ_PIXELS, i) for i in ids]
        missing = [str(f) for f in lq_files if not f.is_file()]
        if missing:
            raise InputError(f"{missing[0]}: missing: the latent cache {latents_dir} lists it; rerun degrade/encode")
        sources = hashlib.sha256((clip_sha + "".join(file_sha256(f) for f in lq_files)).encode()).hexdigest()
        path = out / shard["file"]
        if path.exists() and _shard_ok(path, ids, params_hash, sources):
            reused += 1
        else:
            embeds = robust_clip_embeddings(clip, degraded / LQ_PIXELS, ids, device=clip.pixel_mean.device,
                                            batch_size=embed.batch_size)
            with atomic_path(path) as tmp:
                save_file({EMBEDS: embeds.to(dtype).contiguous()}, str(tmp), metadata=_meta(ids, params_hash, sources))
        shards.append({"file": path.name, "count": len(ids), "sha256": file_sha256(path), "sources_sha256": sources})
        bar.update(len(ids))
    bar.close()
    for stale in sorted(set(out.glob("shard-*.safetensors")) - {out / s["file"] for s in shards}):
        stale.unlink()

    manifest = {"count": len(latents), "embed_dim": clip.embed_dim, "dtype": embed.dtype, "robust_clip": clip_sha,
                "latents_manifest": file_sha256(latents_dir / MANIFEST), "params_hash": params_hash, "shards": shards}
    write_json(out / layout.REPORT, {"embedded": len(latents), "shards_reused": reused})
    write_json(out / MANIFEST, manifest)
    log.info("embed_clip: %d LQ images in %d shards (%d reused), D = %d", len(latents), len(shards), reused,
             clip.embed_dim)
    return manifest


class ImageEmbeddingCache(LatentPairDataset):
    """Item ``i``: the (D,) robust CLIP embedding of latent-cache item ``i``, read from its shard on demand."""

    written_by = "embed-clip"

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    def check_matches(self, latents: LatentPairDataset, robust_clip_dir: str | os.PathLike) -> None:
        """Refuse a cache made from other latents or another robust CLIP than the ones given."""
        from consissr.models.robust_clip import WEIGHTS_NAME

        if self.ids != latents.ids:
            raise InputError(f"{self.root}: its ids differ from the latent cache {latents.root}; rerun `consissr embed-clip`")
        if self.manifest["robust_clip"] != file_sha256(Path(robust_clip_dir) / WEIGHTS_NAME):
            raise InputError(f"{self.root}: made with another robust CLIP than {robust_clip_dir}; "
                             "rerun `consissr embed-clip`")

    def __getitem__(self, i: int) -> torch.Tensor:
        s, row = self._index[i]
        return self._shard(s).get_slice(EMBEDS)[row]


__all__ = ["EMBEDS", "ImageEmbeddingCache", "embed_lq_images", "robust_clip_embeddings"]
