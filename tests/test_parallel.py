"""Data stages' Dask clusters (consissr/data/parallel.py): workers that never come up fail fast and clearly."""

import multiprocessing
import time

import pytest

from consissr.config import ParallelParams, params_from_dict
from consissr.data.parallel import local_cluster, run_shards
from consissr.errors import ClusterStartError, ParamsError


def _double(x):
    return 2 * x


def test_a_scheduler_without_workers_fails_within_the_timeout():
    from dask.distributed import LocalCluster

    # a real scheduler on 127.0.0.1 that never gets a worker (an empty cluster, in this process)
    with LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                      dashboard_address=None) as empty:
        parallel = ParallelParams(workers=2, scheduler_address=empty.scheduler_address, worker_start_timeout=1.5)
        start = time.monotonic()
        with pytest.raises(ClusterStartError) as info:
            run_shards(_double, [1, 2], parallel, desc="test")
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert 1.5 <= elapsed < 20, elapsed
    assert "0 of 1 Dask workers" in message and empty.scheduler_address in message
    assert "parallel.worker_start_timeout" in message


def test_a_local_cluster_whose_workers_do_not_start_in_time_is_closed_and_reported():
    before = {p.pid for p in multiprocessing.active_children()}
    start = time.monotonic()
    with pytest.raises(ClusterStartError, match=r"0 of 2 Dask workers came up on a local cluster of 2 processes"):
        local_cluster(2, start_timeout=0.05)  # a worker process takes far longer than 50 ms to start
    assert time.monotonic() - start < 30
    deadline = time.monotonic() + 10  # the nannies' processes are ended, not left running
    while {p.pid for p in multiprocessing.active_children()} - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {p.pid for p in multiprocessing.active_children()} - before == set()


def test_a_local_cluster_that_starts_in_time_runs_the_shards():
    assert run_shards(_double, [1, 2, 3], ParallelParams(workers=2, worker_start_timeout=120), desc="test") == [2, 4, 6]


@pytest.mark.parametrize("value", [0, -5])
def test_worker_start_timeout_must_be_positive(value):
    with pytest.raises(ParamsError, match=r"parallel\.worker_start_timeout: must be > 0"):
        params_from_dict({"parallel": {"worker_start_timeout": value}})
