"""Past one machine: the campaign's tasks on a Dask cluster (`refcache verify --cluster ADDRESS`).

Why Dask (distributed) and not Ray or HypoFuzz: our tasks are already plain functions with
deadlines that return plain dicts (campaign.workers), and `Client.get_executor()` gives them a
`concurrent.futures.Executor`, so the cluster is one more pool behind the same scheduling loop.
It is pure Python and small to install (the `cluster` extra); Ray brings its own object store and
daemons for nothing we use, and HypoFuzz shares an example database but has no place for the
proofs, the hunts' deadlines or the merged report.

ADDRESS is a scheduler (`tcp://host:8786`) whose workers have refcache installed, or `local:N`
for a local cluster of N single-threaded worker processes (started here, stopped at the end).
Every worker thread is one job. Reports travel back with the task results (campaign.workers),
so workers need no shared disk.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from dataclasses import dataclass


class ClusterError(RuntimeError):
    """The cluster cannot be used (Dask missing, no scheduler at the address, no workers)."""


@dataclass
class Cluster:
    executor: cf.Executor
    jobs: int  # worker threads: how many tasks to keep in flight
    where: str  # for the progress line and the summary
    close: Callable[[], None]


def connect(address: str, timeout_s: float = 10.0) -> Cluster:
    """A pool on the cluster at `address` (see the module doc)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise ClusterError("--cluster needs Dask: pip install -e '.[cluster]'") from e
    local = None
    if address.startswith("local:"):
        try:
            n = int(address.removeprefix("local:"))
        except ValueError:
            raise ClusterError(f"--cluster {address!r}: local:N wants a number of workers") from None
        if n < 1:
            raise ClusterError("--cluster local:N wants at least one worker")
        local = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        address = local.scheduler_address
    try:
        client = Client(address, timeout=timeout_s)
    except OSError as e:
        if local is not None:
            local.close()
        raise ClusterError(f"no Dask scheduler reachable at {address}: {e}") from e
    threads = sum(client.nthreads().values())
    if threads < 1:
        client.close()
        raise ClusterError(f"the Dask cluster at {address} has no workers")

    def close() -> None:
        client.close()
        if local is not None:
            local.close()

    where = f"Dask cluster at {address}: {len(client.nthreads())} workers, {threads} threads"
    return Cluster(client.get_executor(pure=False), threads, where, close)
