"""Deployment on 127.0.0.1: a real SuperLink with TLS and SuperNode authentication.

The processes are started with the scripts of ``deploy/`` (docs/deployment.md),
with certificates and keys those scripts make, free ports, and ``FLWR_HOME``
and every file in a temporary folder; fixtures stop each process (and what it
started) by PID, also when a test fails. Each run's final status is read from
the SuperLink (``finished:completed``), not from ``flwr run``'s exit code.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from deploy_harness import DEPLOY, Federation, RunOutcome, free_port, terminate

pytestmark = pytest.mark.deployment

#: A short Mosaic schedule: warm-up round 1, distillation (generator upload) in
#: round 2, fine-tuning round 3; small enough for a 2-core CI machine.
SHORT_MOSAIC = {"num-clients": 3, "min-clients": 2, "num-server-rounds": 3, "local-epochs": 1,
                "strategy": "mosaic", "mosaic-warmup-rounds": 1, "mosaic-generator-steps": 5,
                "mosaic-meta-epochs": 2, "mosaic-distill-steps": 5}
NODES = ["supernode-0", "supernode-1", "supernode-2"]


def metrics_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def node_log(federation: Federation, name: str, partition_id: int) -> list[dict]:
    path = federation.state / "nodes" / name / "logs" / f"client-{partition_id}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """SuperLink + 3 registered SuperNodes (node 2 trains on a data set of its own),
    and an intruder: a SuperNode whose key was never registered."""
    fed = Federation(tmp_path_factory.mktemp("deployment"))
    try:
        fed.make_credentials([*NODES, "intruder"])
        # Node 2's own data: half of the digits training set (not partition 2 of 3).
        own_data = fed.base / "node-2-data"
        export = fed.start_script("export_partition.py", "--partition-id", "0",
                                  "--num-partitions", "2", "--out", str(own_data))
        fed.start_superlink()
        fed.register(*NODES)
        out, _ = export.communicate(timeout=180)
        assert export.returncode == 0, out
        fed.own_data_size = int(out.split()[1])  # "wrote N training samples ..."
        fed.start_supernode("supernode-0", 0, 3, "--device", "cpu", "--threads", "1")
        fed.start_supernode("supernode-1", 1, 3, "--threads", "1")
        fed.start_supernode("supernode-2", 2, 3, "--threads", "1", "--data-path", str(own_data))
        fed.intruder = fed.start_supernode("intruder", 0, 3)
        fed.wait_online(3)
        try:
            fed.intruder_exit = fed.intruder.wait(timeout=60)
        except subprocess.TimeoutExpired:  # still running: it was not refused
            fed.intruder_exit = None
            terminate(fed.intruder)
        yield fed
    finally:
        fed.stop()


@pytest.fixture(scope="module")
def mosaic_run(federation) -> tuple[RunOutcome, Path]:
    """One short Mosaic run on the three registered SuperNodes (after the intruder was refused)."""
    results = federation.base / "results"
    outcome = federation.run({**SHORT_MOSAIC, "output-dir": str(results), "run-name": "mosaic"},
                             name="mosaic")
    return outcome, results / "mosaic"


def test_mosaic_runs_over_tls_with_supernode_authentication(federation, mosaic_run):
    outcome, run_dir = mosaic_run
    assert outcome.completed, outcome.log[-4000:]
    assert outcome.exit_code == 0  # deploy/run.sh reports the status it read
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["strategy"] == "mosaic"
    assert summary["num_clients"] == 3 and [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in summary["rounds"])
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    lines = metrics_lines(run_dir)
    assert [m["phase"] for m in lines] == ["warmup", "distill", "finetune"]
    assert [m["clients_ok"] for m in lines] == [3, 3, 3]
    distill = lines[1]  # every node uploaded its generator; the server distilled
    assert distill["generator_seconds_sum"] > 0 and distill["num_prototypes"] > 0
    assert distill["distill_seconds"] > 0 and 0.0 <= distill["teacher_accuracy"] <= 1.0

    # Each node logged what it answered, in its own folder; node 2 used its own data.
    for pid, name in enumerate(NODES):
        records = [r for r in node_log(federation, name, pid)
                   if r["run-id"] == int(outcome.run_id)]
        assert [r["server-round"] for r in records if r["message"] == "train"] == [1, 2, 3]
        sizes = {r["num-examples"] for r in records}
        if name == "supernode-2":
            assert sizes == {federation.own_data_size}
        else:
            assert sizes != {federation.own_data_size} and len(sizes) == 1

    # The traffic went over TLS only: plain HTTP and an unknown CA are refused.
    ca = federation.state / "certificates" / "ca.crt"
    trusted = ssl.create_default_context(cafile=str(ca))
    assert httpx.get(f"https://localhost:{federation.port}/health", verify=trusted).is_success
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{federation.port}/health", timeout=5)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{federation.port}/health", timeout=5)  # system CAs only
    listed = json.loads(federation.flwr("ls", federation.connection, "--run-id", outcome.run_id,
                                        "--format", "json").stdout)["runs"][0]
    print(f"network traffic of the run: {listed['network-traffic']}")


def test_unregistered_supernode_is_refused_and_the_run_completes_without_it(
        federation, mosaic_run):
    assert federation.intruder_exit not in (0, None)  # it exited by itself, with an error
    assert "Failed to activate SuperNode" in federation.node_log("intruder").read_text()
    nodes = federation.supernodes()
    assert len(nodes) == 3 and all(n["status"] == "online" for n in nodes)
    outcome, run_dir = mosaic_run
    assert outcome.completed, outcome.log[-4000:]
    assert all(m["clients_sampled"] == 3 for m in metrics_lines(run_dir))


def test_killed_supernode_leaves_the_run_to_the_others_and_loses_no_result(
        federation, mosaic_run):  # pylint: disable=unused-argument
    """Kill SuperNode 2 (and its ClientApp) once round 1 is recorded: round 2, Mosaic's
    distillation round, goes on with the other two; restarted, the node rejoins."""
    fed = federation
    run_dir = fed.base / "results" / "killed"
    log = fed.base / "killed.log"
    ids_before = {n["node-id"] for n in fed.supernodes()}
    # round-timeout bounds a round that waits for a dead node's reply; the SuperLink
    # usually answers for it earlier (node unavailable after 2 missed heartbeats).
    run = fed.start_run({**SHORT_MOSAIC, "num-server-rounds": 2, "round-timeout": 90.0,
                         "output-dir": str(run_dir.parent), "run-name": "killed"}, log)
    try:
        deadline = time.monotonic() + 240
        while not metrics_lines(run_dir) and time.monotonic() < deadline:
            assert run.poll() is None, log.read_text()[-4000:]
            time.sleep(0.2)
        before = metrics_lines(run_dir)
        assert [m["round"] for m in before] == [1], log.read_text()[-4000:]
        fed.kill_node("supernode-2")  # round 2 (the distillation round) has begun
        outcome = fed.finish_run(run, log)
    finally:
        terminate(run)
    assert outcome.completed, outcome.log[-4000:]
    lines = metrics_lines(run_dir)
    assert lines[0] == before[0]  # what was recorded before the kill is still there
    assert [m["round"] for m in lines] == [1, 2] and lines[1]["phase"] == "distill"
    assert (lines[1]["clients_sampled"], lines[1]["clients_ok"]) == (3, 2)
    assert lines[1]["clients_failed"] + lines[1]["clients_timed_out"] == 1
    assert lines[1]["num_prototypes"] > 0 and lines[1]["distill_seconds"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["rounds"]) == 2
    assert summary["rounds"][0]["accuracy"] == before[0]["accuracy"]
    assert "Node Unavailable" in outcome.log or "no reply before the round timeout" in outcome.log
    assert [r["server-round"] for r in node_log(fed, "supernode-2", 2)
            if r["run-id"] == int(outcome.run_id)] == [1]

    # Restarted with the same command and key, the node rejoins under the same id.
    fed.restart_node("supernode-2")
    nodes = fed.wait_online(3)
    assert {n["node-id"] for n in nodes if n["status"] == "online"} == ids_before


def _flower_pid(path: Path) -> int | None:
    """The PID in a deploy/ PID file, if that process is a live Flower SuperLink/SuperNode."""
    try:
        pid = int(path.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"flower-super" in cmdline else None


def test_background_scripts_and_stop_sh_as_in_the_guide(tmp_path):
    """start_superlink.sh / start_supernode.sh in the background, then deploy/stop.sh."""
    fed = Federation(tmp_path / "guide")
    state = str(fed.state)
    pidfiles = [fed.state / "superlink" / "pid", fed.state / "nodes" / "supernode-0" / "pid",
                fed.state / "nodes" / "intruder" / "pid"]
    try:
        fed.make_credentials(["supernode-0", "intruder"])
        started = fed.script("start_superlink.sh", "--state", state, "--port", str(fed.port))
        assert "SuperLink running (PID" in started.stdout, started.stdout + started.stderr
        fed.script("add_connection.py", "--name", fed.connection, "--address",
                   f"127.0.0.1:{fed.port}", "--ca", f"{state}/certificates/ca.crt")
        fed.register("supernode-0")
        node_args = ["--state", state, "--superlink", f"127.0.0.1:{fed.port}",
                     "--num-partitions", "2", "--partition-id"]
        node = fed.script("start_supernode.sh", *node_args, "0", "--port", str(free_port()))
        assert "SuperNode supernode-0 running (PID" in node.stdout, node.stdout + node.stderr
        refused = fed.script("start_supernode.sh", *node_args, "1", "--name", "intruder",
                             "--port", str(free_port()), check=False)
        assert refused.returncode != 0 and "SuperNode intruder exited" in refused.stderr
        pids = [_flower_pid(path) for path in pidfiles[:2]]
        assert all(pids) and _flower_pid(pidfiles[2]) is None
        assert [n["status"] for n in fed.supernodes()] == ["online"]

        stopped = fed.script("stop.sh", "--state", state)
        assert "supernode-0: PID" in stopped.stdout and "superlink: PID" in stopped.stdout
        time.sleep(0.5)
        assert not any(Path(f"/proc/{pid}").exists() and _flower_pid(path) for pid, path in
                       zip(pids, pidfiles))
        assert not any(path.exists() for path in pidfiles)
    finally:  # whatever the scripts started and stop.sh did not stop
        for path in pidfiles:
            pid = _flower_pid(path)
            if pid is not None:
                os.killpg(pid, signal.SIGKILL)


def test_scripts_explain_themselves():
    for script in sorted(DEPLOY.glob("*.sh")):
        if script.name == "lib.sh":
            continue
        assert os.access(script, os.X_OK), f"{script.name} is not executable (the guide runs it)"
        result = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                                check=False, timeout=30)
        assert result.returncode == 0 and "Usage: deploy/" in result.stdout, script.name
