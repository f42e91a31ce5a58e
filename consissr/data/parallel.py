"""Shards of a data stage's item list, run on a Dask cluster (``dask.distributed``).

``parallel.workers`` 1 runs the shards in this process, in order; N > 1 starts a ``LocalCluster``
of N processes with one thread each; ``parallel.scheduler_address`` sends them to a running
scheduler instead (Kubernetes, SLURM: the workers need this package and the same file paths).
Workers that are not running within ``parallel.worker_start_timeout`` seconds fail the stage with
``ClusterStartError`` instead of leaving it waiting.
A shard function writes its outputs itself and returns a small record; results come back in
shard order, so the merged index is the same for any number of workers. Every shard runs with one
torch / OpenCV thread: float results (VAE convolutions) depend on the thread count.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from tqdm import tqdm

from consissr.config import ParallelParams
from consissr.errors import ClusterStartError

log = logging.getLogger(__name__)

T = TypeVar("T")


def split(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` in consecutive chunks of ``size`` (the last one shorter)."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def shard_size(n: int, workers: int, *, per_worker: int = 4, cap: int = 256) -> int:
    """Items per shard: about ``per_worker`` shards per worker (load balance), at most ``cap`` items each."""
    return max(1, min(cap, math.ceil(n / (max(workers, 1) * per_worker))))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch and OpenCV on one thread (what a Dask worker of this module runs with), restored on exit."""
    import cv2
    import torch

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)


def local_cluster(workers: int, *, start_timeout: float | None = None):
    """A ``LocalCluster`` of ``workers`` processes with one thread each, and glibc's default malloc.

    Dask's nannies set ``MALLOC_TRIM_THRESHOLD_=65536`` in their workers (to hand freed memory back
    to the OS). Setting it also fixes glibc's mmap threshold, so every large tensor is a fresh,
    zero-filled mmap: a worker degraded 32% slower with it (0.98 vs 0.74 s per 512² image) for
    about 125 MiB less RSS. Unset here for the workers this module starts; a user's own
    ``MALLOC_TRIM_THRESHOLD_`` or ``parallel.scheduler_address`` cluster keeps its setting.

    With ``start_timeout`` (seconds), a cluster whose workers are not all running by then is closed
    and ``ClusterStartError`` raised (seen once while other jobs held both cores: the start hung).
    """
    import dask
    from dask.distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        # no workers in the constructor, which would wait for them with no limit; a nanny's
        # death_timeout bounds its own start, so closing the cluster after a timeout cannot hang
        cluster = LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None,
                               death_timeout=start_timeout)
        try:
            cluster.scale(workers)
            wait_for_workers(cluster, workers, start_timeout, where=f"a local cluster of {workers} processes")
        except BaseException:
            cluster.close()
            raise
    return cluster


def wait_for_workers(cluster_or_client, n: int, timeout: float | None, *, where: str) -> None:
    """Block until ``n`` workers run; ``ClusterStartError`` naming ``where`` after ``timeout`` seconds."""
    from distributed.exceptions import WorkerStartTimeoutError

    try:
        cluster_or_client.wait_for_workers(n, timeout=timeout)
    except WorkerStartTimeoutError as exc:
        raise ClusterStartError(
            f"parallel: {exc.available_workers} of {n} Dask workers came up on {where} within "
            f"{timeout:g} s (parallel.worker_start_timeout); check that the machine has free cores or the "
            "scheduler has workers, or raise parallel.worker_start_timeout") from None


def _run_one(fn: Callable[[Any], Any], shard: Any) -> Any:
    with one_thread():
        return fn(shard)


def run_shards(fn: Callable[[Any], T], shards: Sequence[Any], parallel: ParallelParams, *, desc: str) -> list[T]:
    """``[fn(s) for s in shards]``, on the cluster ``parallel`` names; an exception in a shard is raised here.

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one).
    """
    bar = tqdm(total=len(shards), desc=f"{desc} (shards)", unit="shard")
    if parallel.scheduler_address is None and parallel.workers == 1:
        out = []
        for shard in shards:
            out.append(_run_one(fn, shard))
            bar.update(1)
        bar.close()
        return out

    from dask.distributed import Client, as_completed

    with contextlib.ExitStack() as stack:
        if parallel.scheduler_address is not None:
            client = stack.enter_context(Client(parallel.scheduler_address))
            wait_for_workers(client, 1, parallel.worker_start_timeout,
                             where=f"the scheduler {parallel.scheduler_address}")
        else:
            cluster = stack.enter_context(local_cluster(parallel.workers,
                                                        start_timeout=parallel.worker_start_timeout))
            client = stack.enter_context(Client(cluster))
        log.info("%s: %d shards on %s", desc, len(shards), client)
        futures = client.map(_run_one, [fn] * len(shards), shards, pure=False)
        for _ in as_completed(futures):
            bar.update(1)
        out = client.gather(futures)  # raises the first failed shard's exception
    bar.close()
    return out


__all__ = ["local_cluster", "one_thread", "run_shards", "shard_size", "split", "wait_for_workers"]
