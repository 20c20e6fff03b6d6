"""`sweep --executor ray` on a real two-node Ray cluster started on this machine, every process on 127.0.0.1.

The head and a second node get one CPU each and a small object store; the sweep runs in its own process
as a user's would, and the cluster is stopped at teardown (every process of each node's session), even on failure.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from onnxprune.cli import main

pytest.importorskip("ray", reason="the Ray executor is tested with onnxprune[ray] installed (the test extras)")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
NODE = Path(__file__).with_name("ray_node.py")
GRID = ["--ratio", "0.3,0.6", "--criterion", "l1,hybrid", "--recover", "none,lstsq"]  # 8 candidates


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": path, **extra}


# the head and the driver keep 127.0.0.1 (see tests/ray_node.py for the second node)
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _session(sid: int) -> list[int]:
    """The processes of session `sid`: a node's servers and the worker processes its raylet starts (each
    worker has a process group of its own, but stays in the session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _stop(sessions: list[int]) -> None:
    """SIGTERM to every process of each node's session, SIGKILL to what is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in (p for s in sessions for p in _session(s)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_session(s) for s in sessions):
            time.sleep(0.2)


def _nodes_alive(address: str) -> int:
    status = subprocess.run([sys.executable, str(NODE), "status", "--address", address], check=False,
                            capture_output=True, text=True, timeout=60, env=_environment(**LOOPBACK))
    active = status.stdout.split("Active:")[-1].split("Pending:")[0] if "Active:" in status.stdout else ""
    return sum(1 for line in active.splitlines() if "node_" in line)


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="opray", dir="/tmp")  # short: Ray's socket paths live under it
    common = ["--num-cpus", "1", "--object-store-memory", str(80 * 2**20), "--disable-usage-stats"]
    sessions: list[int] = []

    def start(args: list[str], env: dict[str, str]) -> None:
        process = subprocess.Popen([sys.executable, str(NODE), "start", *args, *common], env=env,
                                   start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        sessions.append(process.pid)  # a session of its own: every process of the node stays in it
        out, _ = process.communicate(timeout=180)
        assert process.returncode == 0, out[-2000:]

    try:
        start(["--head", "--node-ip-address=127.0.0.1", "--port", str(port), "--include-dashboard=false",
               "--dashboard-host=127.0.0.1", "--ray-client-server-port", str(free_port()), "--temp-dir", temp],
              _environment(**LOOPBACK))
        start(["--address", address], _environment())
        deadline = time.monotonic() + 90
        while _nodes_alive(address) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(1)
        yield {"address": address, "sessions": sessions}
    finally:
        _stop(sessions)


def _bound_addresses(sessions: list[int]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the listening TCP sockets and bound UDP sockets of the cluster's processes, read
    from /proc (the socket inodes each process holds, looked up in /proc/net/{tcp,udp}{,6})."""
    inodes = set()
    for pid in (p for s in sessions for p in _session(s)):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("tcp", "tcp6", "udp", "udp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            host, port = fields[1].split(":")
            listening = fields[3] == "0A" if table.startswith("tcp") else int(port, 16) != 0
            if fields[9] in inodes and listening:
                raw = bytes.fromhex(host)
                # /proc/net prints each 32-bit word of the address in host (little-endian) byte order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.add(ipaddress.ip_address(raw))
    return found


def _loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _ray_sweep(address: str, outdir: Path, *extra: str, grid: list[str] = GRID) -> subprocess.Popen:
    argv = [sys.executable, "-m", "onnxprune.cli", "sweep", str(MODELS / "digits_cnn.onnx"),
            "--data", str(MODELS / "digits_calib.npz"), "--limit", "100", "--eval-data",
            str(MODELS / "digits_heldout.npz"), "-o", str(outdir), "--runs", "20", "--warmup", "2", *grid,
            "--executor", "ray", "--address", address, *extra]
    return subprocess.Popen(argv, env=_environment(**LOOPBACK, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _candidates(outdir: Path) -> list[dict]:
    return json.loads((outdir / "sweep.json").read_text())["candidates"]


def _sizes_and_values(candidates: list[dict]) -> list[tuple]:
    return [(c["id"], c["status"], c["metrics"]["metric"], c["metrics"]["value"], c["metrics"]["macs"],
             c["metrics"]["params"], c["metrics"]["bytes"]) for c in candidates]


def test_ray_sweep_gives_the_local_executors_metrics(cluster, tmp_path):
    on_ray, local = tmp_path / "ray", tmp_path / "local"
    process = _ray_sweep(cluster["address"], on_ray)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    assert main(["sweep", str(MODELS / "digits_cnn.onnx"), "--data", str(MODELS / "digits_calib.npz"),
                 "--limit", "100", "--eval-data", str(MODELS / "digits_heldout.npz"), "-o", str(local),
                 "--runs", "20", "--warmup", "2", *GRID]) == 0
    remote = _candidates(on_ray)
    assert len(remote) == 8 and all(c["status"] == "ok" for c in remote)
    assert _sizes_and_values(remote) == _sizes_and_values(_candidates(local))
    assert all(c["metrics"]["latency_ms"] > 0 for c in remote)
    # candidates ran as Ray tasks in worker processes of the cluster, not in the driver
    workers = {json.loads((on_ray / "candidates" / f"{c['id']}.json").read_text())["worker"]["pid"] for c in remote}
    assert process.pid not in workers
    # Pareto members' models came back through the object store into OUTDIR
    assert {p.stem for p in (on_ray / "models").glob("*.onnx")} == {c["id"] for c in remote if c["pareto"]}
    bound = _bound_addresses(cluster["sessions"])
    assert bound and all(_loopback(a) for a in bound), bound


def _task_processes(sessions: list[int]) -> list[int]:
    """Ray worker processes of the cluster that are running a candidate now (their title names the task)."""
    found = []
    for sid in sessions:
        for pid in _session(sid):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(b"ray::_ray_execute"):
                found.append(pid)
    return found


@pytest.mark.parametrize("retries", [2, 0])
def test_a_worker_killed_mid_sweep(cluster, tmp_path, retries):
    """SIGKILL to a worker process while it runs a candidate: with retries Ray runs the task again and every
    candidate ends done; without, that candidate is reported failed with the reason and the others done."""
    outdir = tmp_path / "killed"
    # 1000 timed runs make every task last long enough that the kill lands inside it
    process = _ray_sweep(cluster["address"], outdir, "--retries", str(retries), "--runs", "1000",
                         grid=["--ratio", "0.3,0.6", "--recover", "none,lstsq"])
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and process.poll() is None and time.monotonic() < deadline:
        if any(line.startswith("original:") for line in lines):  # the baseline task is done: kill a candidate
            running = _task_processes(cluster["sessions"])
            if running:
                os.kill(running[0], signal.SIGKILL)
                killed, killed_at = running[0], time.time()
        time.sleep(0.05)
    process.wait(timeout=600)
    reader.join(timeout=10)
    assert killed is not None, "no candidate was seen running: nothing was killed"
    assert process.returncode == 0, "".join(lines)[-3000:]
    candidates = _candidates(outdir)
    assert len(candidates) == 4
    failed = [c for c in candidates if c["status"] != "ok"]
    if retries:
        assert not failed, failed
    else:
        assert len(failed) == 1 and "the Ray task failed after 0 retries" in failed[0]["error"], failed
        assert failed[0]["metrics"] is None and not failed[0]["pareto"]
    done = [json.loads((outdir / "candidates" / f"{c['id']}.json").read_text()) for c in candidates]
    # no result comes from the killed run; the process may have finished other candidates before the kill
    assert all(d["worker"]["ended"] <= killed_at for d in done if d["worker"] and d["worker"]["pid"] == killed)
