"""A real Flower deployment on 127.0.0.1 for tests: SuperLink + SuperNodes, TLS, node auth.

Everything is started with the scripts under ``deploy/`` (the ones the guide
tells users to run), in the foreground so the test owns each process by PID,
with free ports, ``FLWR_HOME`` and every file in a temporary folder.
:meth:`Federation.stop` ends each started process, and every process those
started (found through the process tree before signalling), by PID.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mosaic_flwr.simulation import FLOWER_ENV, free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` in the process tree (children first)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], list(children.get(pid, []))
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children.get(child, []))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def terminate(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 15.0) -> None:
    """Stop ``proc`` (a session leader we started) and everything below it, by PID.

    Signals the process group ``proc.pid`` leads and each descendant found in
    the process tree (Flower starts some helpers in sessions of their own);
    whatever is left after ``wait`` seconds gets SIGKILL.
    """
    pids = [proc.pid, *descendants(proc.pid)]
    _signal(proc.pid, pids, sig)
    if not _gone(proc, pids, wait) and sig != signal.SIGKILL:
        pids += [p for p in descendants(proc.pid) if p not in pids]
        _signal(proc.pid, pids, signal.SIGKILL)
        _gone(proc, pids, 5.0)


def _signal(leader: int, pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            if pid == leader:
                os.killpg(pid, sig)
            elif _alive(pid):
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _gone(proc: subprocess.Popen, pids: list[int], wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        proc.poll()  # reaps our own child
        if not any(_alive(pid) for pid in pids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


@dataclass
class RunOutcome:
    """How a deployed run ended."""

    run_id: str
    status: str
    log: str
    exit_code: int

    @property
    def completed(self) -> bool:
        """True when the SuperLink reports ``finished:completed``."""
        return self.status == "finished:completed"


class Federation:  # pylint: disable=too-many-instance-attributes
    """One SuperLink (TLS, SuperNode authentication) and its SuperNodes on 127.0.0.1."""

    def __init__(self, base: Path, connection: str = "mosaic-test") -> None:
        self.base = base
        self.state = base / "state"
        self.home = base / "flwr-home"
        self.connection = connection
        self.port = free_port()
        bindir = str(Path(sys.executable).parent)
        self.env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home),
                    "PATH": os.pathsep.join([bindir, os.environ.get("PATH", "")])}
        self.superlink: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_args: dict[str, tuple[str, ...]] = {}
        self.base.mkdir(parents=True, exist_ok=True)

    # --- helpers -----------------------------------------------------------
    def script(self, name: str, *args: str, timeout: float = 120,
               check: bool = True) -> subprocess.CompletedProcess:
        """Run one deploy/ script (Python or bash) in the base folder."""
        path = DEPLOY / name
        command = [sys.executable, str(path)] if name.endswith(".py") else ["bash", str(path)]
        result = subprocess.run([*command, *args], cwd=self.base, env=self.env, text=True,
                                capture_output=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"{name} {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}")
        return result

    def start_script(self, name: str, *args: str) -> subprocess.Popen:
        """Start one deploy/ Python script in the background (output in a pipe)."""
        return subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, str(DEPLOY / name), *args], cwd=self.base, env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command with this federation's FLWR_HOME."""
        return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args], cwd=self.base,
                              env=self.env, text=True, capture_output=True, timeout=timeout,
                              check=False)

    def _spawn(self, name: str, *args: str, log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            return subprocess.Popen(  # pylint: disable=consider-using-with
                ["bash", str(DEPLOY / name), *args, "--foreground"], cwd=self.base, env=self.env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def key(self, name: str) -> Path:
        """Private key of the SuperNode ``name``."""
        return self.state / "keys" / name

    # --- setting up --------------------------------------------------------
    def make_credentials(self, key_names: list[str]) -> None:
        """The CA, the SuperLink's certificate and SuperNode keys, made by the deploy scripts."""
        self.script("make_certificates.py", "--out", str(self.state / "certificates"))
        self.script("make_supernode_keys.py", "--out", str(self.state / "keys"), *key_names)

    def start_superlink(self, timeout: float = 60) -> None:
        """Start the SuperLink, wait until it answers over HTTPS, write the connection."""
        log = self.state / "superlink.log"
        self.superlink = self._spawn("start_superlink.sh", "--state", str(self.state),
                                     "--port", str(self.port), log=log)
        deadline = time.monotonic() + timeout
        import httpx  # pylint: disable=import-outside-toplevel

        ca = str(self.state / "certificates" / "ca.crt")
        context = ssl.create_default_context(cafile=ca)
        while True:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"the SuperLink exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"https://127.0.0.1:{self.port}/health", verify=context,
                             timeout=1).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not answer:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        self.script("add_connection.py", "--name", self.connection,
                    "--address", f"127.0.0.1:{self.port}", "--ca", ca)

    def register(self, *names: str) -> None:
        """Register the public keys of these SuperNodes with the SuperLink (in parallel)."""
        flwr = str(Path(sys.executable).parent / "flwr")
        procs = [subprocess.Popen(  # pylint: disable=consider-using-with
            [flwr, "supernode", "register", f"{self.key(name)}.pub", self.connection],
            cwd=self.base, env=self.env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT) for name in names]
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert "registered successfully" in out, out

    def start_supernode(self, name: str, partition_id: int, num_partitions: int,
                        *extra: str) -> subprocess.Popen:
        """Start SuperNode ``name`` with its own runtime port; returns its process."""
        args = ("--name", name, "--state", str(self.state), "--superlink",
                f"127.0.0.1:{self.port}", "--port", str(free_port()), "--partition-id",
                str(partition_id), "--num-partitions", str(num_partitions), *extra)
        self.node_args[name] = args
        self.nodes[name] = self._spawn("start_supernode.sh", *args, log=self.node_log(name))
        return self.nodes[name]

    def restart_node(self, name: str) -> subprocess.Popen:
        """Start SuperNode ``name`` again with the same settings (after it stopped)."""
        self.nodes[name] = self._spawn("start_supernode.sh", *self.node_args[name],
                                       log=self.node_log(name))
        return self.nodes[name]

    def node_log(self, name: str) -> Path:
        """The SuperNode's own log (its stdout and stderr)."""
        return self.state / "nodes" / name / "supernode.log"

    def supernodes(self) -> list[dict[str, Any]]:
        """``flwr supernode ls`` as a list of dicts (node-id, status, ...)."""
        result = self.flwr("supernode", "ls", self.connection, "--format", "json")
        return json.loads(result.stdout)["nodes"]

    def wait_online(self, count: int, timeout: float = 90) -> list[dict[str, Any]]:
        """Block until ``count`` SuperNodes are online."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = self.supernodes()
            if sum(n["status"] == "online" for n in nodes) >= count:
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {nodes} after {timeout}s")
            time.sleep(0.5)

    # --- running -----------------------------------------------------------
    def start_run(self, overrides: dict[str, Any], log: Path) -> subprocess.Popen:
        """Start ``deploy/run.sh`` (flwr run + final status check) in the background."""
        run_config = " ".join(f"{k}={_toml(v)}" for k, v in overrides.items())
        with log.open("wb") as out:
            return subprocess.Popen(  # pylint: disable=consider-using-with
                ["bash", str(DEPLOY / "run.sh"), "--connection", self.connection,
                 "--app", str(ROOT), "--log", str(log.with_suffix(".flwr.log")),
                 "--run-config", run_config],
                cwd=self.base, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def finish_run(self, proc: subprocess.Popen, log: Path, timeout: float = 420) -> RunOutcome:
        """Wait for ``deploy/run.sh``; read the run id and status it reported."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            terminate(proc)
        text = log.read_text(errors="replace")
        run_id = next((line.rsplit(" ", 1)[-1] for line in text.splitlines()
                       if "Successfully started run" in line), "")
        status = ""
        if run_id:
            listed = self.flwr("ls", self.connection, "--run-id", run_id, "--format", "json")
            status = json.loads(listed.stdout)["runs"][0]["status"]
        return RunOutcome(run_id, status, text, proc.returncode if proc.returncode is not None
                          else -1)

    def run(self, overrides: dict[str, Any], name: str = "run", timeout: float = 420) -> RunOutcome:
        """One run to its end."""
        log = self.base / f"{name}.log"
        return self.finish_run(self.start_run(overrides, log), log, timeout)

    # --- stopping ----------------------------------------------------------
    def kill_node(self, name: str) -> None:
        """SIGKILL SuperNode ``name`` and everything it started (a machine that died)."""
        terminate(self.nodes[name], signal.SIGKILL, wait=5)

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink, with what they started, by PID."""
        for proc in self.nodes.values():
            terminate(proc)
        if self.superlink is not None:
            terminate(self.superlink)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value) + "'"
