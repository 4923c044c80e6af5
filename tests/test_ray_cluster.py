"""`simulate --ray-address`: a run on an existing Ray cluster of two nodes on this machine.

`LocalSuperLink(ray_address=...)` puts `RAY_ADDRESS` into the environment of the
SuperLink, which passes it on to the simulation process it spawns; Flower's Ray
backend there calls `ray.init()`, which joins that cluster. Each node has one CPU
and each client asks for one, so Flower's actor pool (sized from the cluster's
resources) has one ClientApp actor per node. After the run the test reads the
cluster's GCS: the simulation was its job, and the ClientApp actors (kept in the
actor table after they died) ran on both nodes.

The nodes are stopped by process, never with `ray stop` (which stops every Ray
instance on the machine): `ray start` runs in a new session, its daemons stay in
that session, and teardown ends that session's processes and their children.
"""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import MOSAIC, write_imagefolder

from mosaic_flwr.simulation import LocalSuperLink, free_port, simulate

#: Two clients, Mosaic's warm-up and distillation rounds at their smallest, on a user's
#: own folder of 24x24 RGB images in 5 classes (written by the test): the run is about
#: where the clients run, and it also takes Mosaic through `flwr run` on data that no
#: registration describes.
RUN = {**MOSAIC, "num-clients": 2, "min-clients": 2, "num-server-rounds": 2,
       "mosaic-finetune-rounds": 0, "local-epochs": 1, "partitioner": "iid"}

#: Flags for both nodes: one CPU each, no GPU, a small object store, and ports the OS
#: picks for the workers, so that nothing collides with another Ray on this machine.
NODE_FLAGS = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
              "--object-store-memory=100000000", "--min-worker-port=0", "--max-worker-port=0",
              "--disable-usage-stats"]


def _ray_bin() -> str:
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else shutil.which("ray") or "ray"


def _processes() -> dict[int, tuple[str, int, int]]:
    """pid -> (name, parent pid, session id) of every live (not zombie) process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        state, ppid, _, sid = tail.split()[:4]
        if state != "Z":
            table[int(entry.name)] = (head.split("(", 1)[1], int(ppid), int(sid))
    return table


def _session_processes(sessions: set[int]) -> dict[int, str]:
    """pid -> name of the processes of these sessions and all their descendants."""
    table = _processes()
    found = {pid for pid, (_, _, sid) in table.items() if sid in sessions}
    while children := {pid for pid, (_, ppid, _) in table.items() if ppid in found} - found:
        found |= children
    return {pid: table[pid][0] for pid in found}


def _signal(pids: list[int], sig: int, sessions: set[int], grace: float) -> None:
    """Send ``sig`` to these processes; wait up to ``grace`` seconds for them to exit."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while set(pids) & set(_session_processes(sessions)) and time.monotonic() < deadline:
        time.sleep(0.1)


def _stop_sessions(sessions: set[int], grace: float = 5.0) -> None:
    """Stop these sessions' processes in `ray stop`'s order: raylets first, then the other
    daemons and workers, the GCS last; then SIGKILL whatever outlived its SIGTERM."""
    def select(keep) -> list[int]:
        return [pid for pid, name in _session_processes(sessions).items() if keep(name)]

    for keep in (lambda name: name == "raylet", lambda name: name != "gcs_server",
                 lambda name: True):
        _signal(select(keep), signal.SIGTERM, sessions, grace)
    _signal(select(lambda name: True), signal.SIGKILL, sessions, grace)


def _gcs(address: str):
    from ray._raylet import GcsClient  # pylint: disable=import-outside-toplevel,no-name-in-module

    return GcsClient(address=address)


def _alive_nodes(address: str) -> set[str]:
    from ray.core.generated.gcs_pb2 import GcsNodeInfo  # pylint: disable=import-outside-toplevel

    return {node_id.hex() for node_id, info in _gcs(address).get_all_node_info().items()
            if info.state == GcsNodeInfo.ALIVE}


def _actors(address: str) -> list:
    """Every actor in the GCS actor table, dead ones included."""
    gcs = _gcs(address)  # keep the client alive until its reply came: it completes the future

    async def fetch():
        return await asyncio.wait_for(gcs.async_get_all_actor_info(timeout=30), 60)
    return list(asyncio.run(fetch()).values())


@pytest.fixture
def ray_cluster(tmp_path):
    """A Ray head and a second node, one CPU each; yields (address, node ids)."""
    # Ray's socket paths (under the temp dir) must stay within 107 bytes: tmp_path is too long.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    address = f"127.0.0.1:{free_port()}"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    sessions: set[int] = set()

    def ray_start(name: str, *flags: str) -> tuple[subprocess.Popen, Path]:
        log_path = tmp_path / f"ray-start-{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(  # pylint: disable=consider-using-with
                [_ray_bin(), "start", *flags, *NODE_FLAGS, f"--temp-dir={temp_dir}"], env=env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        sessions.add(proc.pid)  # the session id of every daemon it starts
        return proc, log_path

    try:
        # Both at once: `ray start --address` retries until the head's GCS answers.
        starts = {"head": ray_start("head", "--head", f"--port={address.rsplit(':', 1)[1]}",
                                    "--include-dashboard=false",
                                    f"--ray-client-server-port={free_port()}"),
                  "node": ray_start("node", f"--address={address}")}
        for name, (proc, log_path) in starts.items():
            assert proc.wait(timeout=180) == 0, \
                f"ray start ({name}) failed:\n{log_path.read_text()[-3000:]}"
        deadline = time.monotonic() + 60
        while len(nodes := _alive_nodes(address)) < 2:
            assert time.monotonic() < deadline, f"only {len(nodes)} Ray node(s) came up"
            time.sleep(0.2)
        yield address, nodes
    finally:
        _stop_sessions(sessions)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_address_goes_into_the_superlink_environment_only_when_given(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "inherited:1")
    links = [LocalSuperLink(), LocalSuperLink(ray_address="10.0.0.1:6379")]
    monkeypatch.delenv("RAY_ADDRESS")
    links.append(LocalSuperLink())
    try:
        assert [link.env.get("RAY_ADDRESS") for link in links] == \
            ["inherited:1", "10.0.0.1:6379", None]
    finally:
        for link in links:
            link.stop()  # never started: removes its FLWR_HOME


@pytest.mark.e2e
def test_a_simulation_joins_the_cluster_and_runs_clients_on_both_nodes(ray_cluster, tmp_path):
    address, nodes = ray_cluster
    folder = write_imagefolder(tmp_path / "own", per_class=(20, 4))
    with LocalSuperLink(ray_address=address) as link:
        outcome = simulate({**RUN, "dataset": "folder", "data-path": str(folder),
                            "output-dir": str(tmp_path / "runs")}, superlink=link,
                           output_dir=tmp_path, cpus_per_client=1)
    assert outcome.completed, outcome.log[-3000:]
    summary = outcome.summary
    assert summary["num_clients"] == 2 and [r["round"] for r in summary["rounds"]] == [1, 2]
    data = summary["data"]  # shape and classes read from the folder
    assert (data["num_classes"], data["image_size"], data["channels"]) == (5, 24, 3)
    lines = (outcome.run_dir / "metrics.jsonl").read_text().splitlines()
    distill = json.loads(lines[1])  # both clients trained 24x24 RGB generators for it
    assert distill["phase"] == "distill" and distill["clients_ok"] == 2
    assert distill["generator_seconds_sum"] > 0 and distill["num_prototypes"] > 0

    # The simulation process was this cluster's driver (it did not start a Ray of its own) ...
    jobs = list(_gcs(address).get_all_job_info().values())
    assert len(jobs) == 1 and "flwr-simulation" in jobs[0].entrypoint
    # ... and its ClientApp actors ran one on each node.
    actors = [a for a in _actors(address) if a.class_name == "ClientAppActor"]
    assert len(actors) == 2 and all(a.job_id == jobs[0].job_id for a in actors)
    assert {a.address.node_id.hex() for a in actors} == nodes
