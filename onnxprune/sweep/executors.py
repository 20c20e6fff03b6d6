"""Where candidates run: this process, a local process pool, or tasks on an existing Ray cluster.

Each executor takes the SweepContext once and a list of (id, recipe) tasks, and calls `done(id, record,
model bytes)` on the driver as results come in, in any order. A candidate that raises comes back as a
failed record (candidate.execute catches it); a worker process that dies is retried up to `retries`
times, then its candidate is reported failed with the reason. Nothing in the pipeline knows which
executor ran it.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence

from onnxprune.errors import InputError, MissingDependency
from onnxprune.recipe import Recipe
from onnxprune.sweep.candidate import SweepContext, execute

Task = tuple[str, "Recipe | None"]
Done = Callable[[str, dict, "bytes | None"], None]
EXECUTORS = ("local", "ray")


def run_local(context: SweepContext, tasks: Sequence[Task], done: Done, jobs: int = 1, retries: int = 2) -> None:
    """Candidates in this process (jobs=1) or in `jobs` worker processes (spawned: onnxruntime's threads
    do not survive a fork), each given the context once."""
    if jobs <= 1:
        for key, recipe in tasks:
            record, data = execute(context, recipe)
            done(key, record, data)
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    payload = pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL)
    attempts = {key: 0 for key, _ in tasks}
    pending = list(tasks)
    while pending:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(payload,)) as pool:
            futures = {pool.submit(_worker_execute, recipe): (key, recipe) for key, recipe in pending}
            pending = []
            while futures:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in finished:
                    key, recipe = futures.pop(future)
                    try:
                        record, data = future.result()
                    except BrokenProcessPool:
                        # every unfinished task of a broken pool is lost; each counts one attempt
                        attempts[key] += 1
                        if attempts[key] > retries:
                            done(key, _died(f"a worker process died (tried {attempts[key]} times)"), None)
                        else:
                            pending.append((key, recipe))
                        continue
                    done(key, record, data)


_CONTEXT: SweepContext | None = None


def _init_worker(payload: bytes) -> None:
    global _CONTEXT
    _CONTEXT = pickle.loads(payload)


def _worker_execute(recipe: Recipe | None) -> tuple[dict, bytes | None]:
    assert _CONTEXT is not None, "worker started without its context"
    return execute(_CONTEXT, recipe)


def _died(reason: str) -> dict:
    return {"status": "failed", "error": reason, "metrics": None, "stats": None, "notes": [], "seconds": None,
            "worker": None}


# ---- Ray ----------------------------------------------------------------------------------------------------

def require_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependency("--executor ray needs Ray: pip install 'onnxprune[ray]'") from None
    return ray


def run_ray(context: SweepContext, tasks: Sequence[Task], done: Done, address: str, retries: int = 2,
            cpus_per_task: float = 1.0) -> None:
    """Each candidate as a Ray task on the cluster at `address` (HOST:PORT of its head). The context goes
    into the object store once and every task reads it from there (no shared file system is assumed);
    results come back to the driver. A task whose worker dies is run again up to `retries` times (Ray's
    max_retries), then reported failed."""
    ray = require_ray()
    import logging

    if not address:
        raise InputError("--executor ray needs --address HOST:PORT of the cluster's head")
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ... for a bad address
        raise InputError(f"cannot connect to the Ray cluster at {address}: {' '.join(str(exc).split())[:300]}") \
            from None
    try:
        remote = ray.remote(num_cpus=cpus_per_task, max_retries=retries, retry_exceptions=False)(_ray_execute)
        context_ref = ray.put(context)
        refs = {remote.remote(context_ref, recipe): key for key, recipe in tasks}
        while refs:
            finished, _ = ray.wait(list(refs), num_returns=1)
            for ref in finished:
                key = refs.pop(ref)
                try:
                    record, data = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    reason = " ".join(str(exc).split())[:300]
                    done(key, _died(f"the Ray task failed after {retries} retries: {type(exc).__name__}: "
                                    f"{reason}"), None)
                    continue
                done(key, record, data)
    finally:
        ray.shutdown()


def _ray_execute(context: SweepContext, recipe: Recipe | None) -> tuple[dict, bytes | None]:
    return execute(context, recipe)
