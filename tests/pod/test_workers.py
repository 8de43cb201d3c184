"""LSTMD_WORKERS without a broker: the CPU quota, the workers' member ids, the
supervisor's signals and exit codes (dummy workers), the pod's one health answer,
and the metrics of several processes aggregated."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from daemon.ops import cpus
from daemon.ops.health import Health
from daemon.ops.pod import StatusWriter, WorkersHealth, WorkersMetrics, status_path
from daemon.pod.roles import MULTIPROC_ENV, WorkerRole, instance_id, startup_error_path, worker_settings
from daemon.pod.supervisor import Supervisor
from daemon.streaming.loop import transactional_id
from tests.support.fakes import settings

# -- the CPU quota -------------------------------------------------------------------


def _files(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "50000 100000\n"}, 0.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "garbage\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    assert cpus.cgroup_cpu_quota(_files(tmp_path, files)) == quota


def test_workers_default_to_the_quota_rounded_up_else_the_affinity(tmp_path: Path) -> None:
    assert cpus.available_cpus(_files(tmp_path / "a", {"cpu.max": "150000 100000"})) == 2
    assert cpus.available_cpus(_files(tmp_path / "b", {"cpu.max": "20000 100000"})) == 1
    assert cpus.available_cpus(_files(tmp_path / "c", {"cpu.max": "200000 100000"})) == 2
    unlimited = _files(tmp_path / "d", {"cpu.max": "max 100000"})
    assert cpus.available_cpus(unlimited) == len(os.sched_getaffinity(0))


def test_lstmd_workers_setting(tmp_path: Path) -> None:
    assert settings(tmp_path).workers is None
    assert settings(tmp_path, workers=3).workers == 3
    with pytest.raises(ValueError, match="workers"):
        settings(tmp_path, workers=0)


# -- static membership -----------------------------------------------------------------


def test_instance_ids() -> None:
    assert instance_id("lstmd-0", 0, 1) == "lstmd-0"  # a one-worker pod: as before
    assert instance_id("lstmd-0", 0, 2) == "lstmd-0-w0"
    assert instance_id("lstmd-0", 1, 2) == "lstmd-0-w1"
    assert instance_id(None, 1, 2) is None


def test_each_worker_is_its_own_member_and_transactional_producer(tmp_path: Path) -> None:
    pod = settings(tmp_path, group_instance_id="lstmd-3", delivery="exactly-once")
    ids = set()
    for i in range(2):
        s = worker_settings(pod, i, 2)
        assert s.group_instance_id == f"lstmd-3-w{i}"
        ids.add(transactional_id(s))
    assert len(ids) == 2
    assert worker_settings(pod, 0, 1).group_instance_id == "lstmd-3"


def test_worker_role_from_environment(tmp_path: Path) -> None:
    assert WorkerRole.from_environment({}) is None
    role = WorkerRole.from_environment(
        {"_LSTMD_WORKER_INDEX": "1", "_LSTMD_WORKERS": "2", MULTIPROC_ENV: str(tmp_path)}
    )
    assert role == WorkerRole(1, 2, tmp_path)
    assert role.status_file == status_path(tmp_path, 1)


# -- the pod's health from its workers' -------------------------------------------------


def _status(directory: Path, i: int, *, live: bool = True, ready: bool = True, age: float = 0.0) -> None:
    status = {
        "pid": 1,
        "at": time.time() - age,
        "live": live,
        "live_reason": "ok" if live else "poll loop silent for 400s",
        "ready": ready,
        "ready_reason": "ok" if ready else "no partitions assigned (waiting)",
    }
    status_path(directory, i).write_text(json.dumps(status))


def test_pod_health_is_every_workers(tmp_path: Path) -> None:
    health = WorkersHealth(tmp_path, 2, stale_after_s=30)
    assert health.live() == (True, "ok")  # both starting: live, not ready
    assert health.ready() == (False, "worker 0: starting; worker 1: starting")
    _status(tmp_path, 0)
    assert health.ready() == (False, "worker 1: starting")
    _status(tmp_path, 1, ready=False)
    assert health.ready() == (False, "worker 1: no partitions assigned (waiting)")
    _status(tmp_path, 1)
    assert health.ready() == (True, "ok") and health.live() == (True, "ok")
    _status(tmp_path, 0, live=False)
    assert health.live() == (False, "worker 0: poll loop silent for 400s")
    _status(tmp_path, 0, age=60)
    live, why = health.live()
    assert not live and why.startswith("worker 0: no status for 6")


def test_a_worker_hung_before_its_first_status_is_not_live(tmp_path: Path) -> None:
    health = WorkersHealth(tmp_path, 2, stale_after_s=30)
    health.started_at = time.time() - 20
    _status(tmp_path, 0)
    assert health.live() == (True, "ok")  # worker 1 is still starting
    health.started_at = time.time() - 45
    assert health.live() == (False, "worker 1: no status since it started 45s ago")


def test_status_writer_reports_the_workers_probes(tmp_path: Path) -> None:
    health = Health(liveness_timeout_s=60)
    writer = StatusWriter(health, status_path(tmp_path, 0), threading.Event())
    writer.start()
    try:
        pod = WorkersHealth(tmp_path, 1, stale_after_s=30)
        assert pod.live() == (True, "ok")
        assert pod.ready() == (False, "worker 0: model not loaded")
    finally:
        writer.close()


# -- metrics of several processes ------------------------------------------------------

_WORKER_METRICS = """
import sys
from daemon.ops.metrics import Metrics
m = Metrics()
i = int(sys.argv[1])
m.events_consumed.inc(10 + i)
m.assigned.set(2)
m.active_sequences.set(5)
m.lag.labels(partition="0").set(500 if i == 0 else 100)  # worker 0 owned partition 0 ...
if i == 0:
    m.lag.remove("0")  # ... and released it: worker 1 owns it now
m.lag.labels(partition=str(i + 1)).set(7 * (i + 1))
m.last_poll.set(1000 + i)
"""


def test_metrics_of_the_workers_aggregate(tmp_path: Path) -> None:
    env = dict(os.environ) | {MULTIPROC_ENV: str(tmp_path)}
    for i in range(2):
        subprocess.run([sys.executable, "-c", _WORKER_METRICS, str(i)], env=env, check=True, timeout=60)
    text = WorkersMetrics(tmp_path).exposition().decode()
    lines = set(text.splitlines())
    assert "lstmd_events_consumed_total 21.0" in lines
    assert "lstmd_assigned_partitions 4.0" in lines
    assert "lstmd_active_sequences 10.0" in lines
    assert 'lstmd_consumer_lag{partition="0"} 100.0' in lines  # its new owner's, not the stale 500
    assert 'lstmd_consumer_lag{partition="1"} 7.0' in lines
    assert 'lstmd_consumer_lag{partition="2"} 14.0' in lines
    assert "lstmd_last_poll_timestamp_seconds 1000.0" in lines  # the stalest worker


_WORKER_REBUILDS = """
import orjson
from daemon.core.processor import Processor
from daemon.core.state import StateStore
from daemon.ops.metrics import Metrics
from daemon.replay import FileRecord
from daemon.streaming.rebuild import rebuild_processor
from tests.support.fakes import SumEngine
live = Processor(SumEngine(), model_id="m@1", n_features=1, store=StateStore(0), metrics=Metrics())
live.process([FileRecord("in", 0, 0, 0, b"a", orjson.dumps({"x": [1]}))])
replay = rebuild_processor(live)  # a rebuild replays 3 inputs of another sequence
replay.process([FileRecord("in", 0, i, 0, b"b", orjson.dumps({"x": [1]})) for i in range(3)])
"""


def test_a_rebuilds_replay_counts_nothing_in_the_pods_metrics(tmp_path: Path) -> None:
    """In multiprocess mode every metric object of a process writes to the same files
    by name: the replay's processor must record nothing, or the pod would count its
    inputs as consumed again and report its store as the live one."""
    env = dict(os.environ) | {MULTIPROC_ENV: str(tmp_path)}
    subprocess.run([sys.executable, "-c", _WORKER_REBUILDS], env=env, check=True, timeout=60)
    lines = set(WorkersMetrics(tmp_path).exposition().decode().splitlines())
    assert "lstmd_events_consumed_total 1.0" in lines
    assert "lstmd_active_sequences 1.0" in lines
    assert 'lstmd_inference_duration_seconds_count{engine="sum"} 1.0' in lines


# -- the supervisor, with dummy workers -------------------------------------------------

# A dummy worker: reports itself, exits with argv[1] on SIGTERM, or at once with argv[2].
_DUMMY = """
import os, signal, sys, time
from pathlib import Path
directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
index = os.environ["_LSTMD_WORKER_INDEX"]
mode = sys.argv[1]
(directory / f"started-{index}").write_text(str(os.getpid()))
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif mode == "startup-error":
    (directory / f"startup-error-{index}.txt").write_text("LSTMD_MODEL_PATH: cannot serve it")
    sys.exit(2)
elif mode == "crash-1" and index == "1":
    time.sleep(0.5)
    sys.exit(3)
else:
    signal.signal(signal.SIGTERM, lambda *_: ((directory / f"stopped-{index}").write_text("1"), sys.exit(0)))
while True:
    time.sleep(0.05)
"""


def _supervisor(tmp_path: Path, mode: str, workers: int = 2, timeout_s: float = 1.0) -> Supervisor:
    directory = tmp_path / "workers"
    directory.mkdir()
    s = settings(tmp_path, shutdown_timeout_s=timeout_s)
    return Supervisor(s, workers, command=[sys.executable, "-c", _DUMMY, mode], directory=directory)


def _wait_started(sup: Supervisor) -> None:
    deadline = time.monotonic() + 30
    while not all((sup.directory / f"started-{i}").exists() for i in range(sup.workers)):
        assert time.monotonic() < deadline, "dummy workers did not start"
        time.sleep(0.05)


def _run_in_thread(sup: Supervisor) -> tuple[threading.Thread, list[int]]:
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(sup.run()), daemon=True)
    thread.start()
    return thread, code


def test_sigterm_is_forwarded_to_every_worker_and_exits_0(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "clean", workers=3)
    sup.start()
    _wait_started(sup)
    thread, code = _run_in_thread(sup)
    sup.stop.set()  # what the SIGTERM handler does
    thread.join(30)
    assert code == [0]
    assert all((sup.directory / f"stopped-{i}").exists() for i in range(3))


def test_the_signal_handler_stops_the_supervisor(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "clean")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        sup.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGTERM)
        assert sup.stop.wait(5)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_worker_that_dies_stops_the_others_and_the_pod_fails(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "crash-1")
    sup.start()
    thread, code = _run_in_thread(sup)
    thread.join(30)
    assert code == [1]
    assert (sup.directory / "stopped-0").exists()  # asked to stop, and did cleanly
    assert [p.returncode for p in sup.procs] == [0, 3]


def test_a_worker_that_ignores_sigterm_is_killed_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("daemon.pod.supervisor.SHUTDOWN_MARGIN_S", 0.2)
    sup = _supervisor(tmp_path, "ignore-term", timeout_s=0.5)
    sup.start()
    _wait_started(sup)
    thread, code = _run_in_thread(sup)
    started = time.monotonic()
    sup.stop.set()
    thread.join(30)
    assert code == [1]
    assert time.monotonic() - started < 10
    assert [p.returncode for p in sup.procs] == [-signal.SIGKILL, -signal.SIGKILL]


def test_a_startup_error_is_reported_once_and_exits_2(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "startup-error", workers=3)
    sup.start()
    assert sup.run() == 2
    assert sup.startup_errors == ["LSTMD_MODEL_PATH: cannot serve it"]
    # The first to fail stops the others: one still starting may die of that SIGTERM first.
    assert any(startup_error_path(sup.directory, i).exists() for i in range(3))


def test_a_killed_supervisors_directory_is_removed_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/tmp is an emptyDir that outlives a container: a supervisor killed (no cleanup)
    left its metrics files there, restart after restart. Only the directories of
    supervisors that are gone go; a live one's (its lock held) and others stay."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed = tmp_path / "lstmd-workers-killed"
    killed.mkdir()
    (killed / "counter_123.db").write_bytes(b"x" * 100)
    (killed / "supervisor.lock").write_text("")  # its holder is gone: nobody holds it
    alive = tmp_path / "lstmd-workers-alive"
    alive.mkdir()
    (alive / "supervisor.lock").write_text("")
    other = tmp_path / "lstmd-workers-other"  # no lock file: not a supervisor's, leave it
    other.mkdir()
    with open(alive / "supervisor.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file: a live supervisor's lock
        first = Supervisor(settings(tmp_path), 2)
        second = Supervisor(settings(tmp_path), 2)
    try:
        assert not killed.exists()
        assert alive.exists() and other.exists()
        assert first.directory.exists() and second.directory.exists()  # each holds its own
        assert first.directory.parent == tmp_path and first.directory != second.directory
    finally:
        first.cleanup()
        second.cleanup()
    assert not first.directory.exists()


def test_a_worker_stopped_before_its_handler_is_installed_is_a_clean_stop(tmp_path: Path) -> None:
    """SIGTERM during start-up: a worker still importing dies of the signal itself,
    with nothing in hand; the pod still exits 0."""
    directory = tmp_path / "workers"
    directory.mkdir()
    sup = Supervisor(
        settings(tmp_path),
        2,
        command=[sys.executable, "-c", "import time; time.sleep(30)"],
        directory=directory,
    )
    sup.start()
    sup.stop.set()
    assert sup.run() == 0
    assert [p.returncode for p in sup.procs] == [-signal.SIGTERM, -signal.SIGTERM]
