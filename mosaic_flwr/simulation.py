"""Process control for ``mosaic-flwr simulate``: ``flwr run`` on a private local SuperLink.

Plain ``flwr run .`` works too, but it reuses a detached SuperLink that may
have been started by another checkout with other settings, it gives only two
virtual clients unless told otherwise, and ``flwr run --stream`` exits 0 even
when the run failed. This launcher:

1. resolves and validates the run config first (a mistake fails in a second);
2. starts its own ``flower-superlink --simulation`` on a free loopback port, with
   runtime dependency installation, telemetry and update checks off;
3. runs ``flwr run`` with ``num-supernodes`` equal to ``num-clients``;
4. asks the SuperLink for the run's final status and exits non-zero unless it is
   ``finished:completed``; then stops the SuperLink and everything it started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import RunConfig, resolve_run_config
from .errors import ConfigError, ResumeError
from .results import default_run_name
from .strategies import check_strategy

APP_DIR = Path(__file__).resolve().parent.parent
CONNECTION = "mosaic-sim"

#: Environment every Flower process we start runs with.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """A Flower executable from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"`{name}` not found; install the project (pip install -e .)")
    return found


class LocalSuperLink:
    """A simulation SuperLink on 127.0.0.1 owned by this process (a context manager).

    ``ray_address`` (``host:port`` of a ``ray start --head``) makes the simulation
    join that Ray cluster (``RAY_ADDRESS`` in :attr:`env`) instead of starting a
    local one; empty leaves ``RAY_ADDRESS`` as this process's environment has it.
    """

    #: Seconds the SuperLink may take to answer its health check.
    STARTUP_TIMEOUT = 60.0

    def __init__(self, ray_address: str = "") -> None:
        self.home = Path(tempfile.mkdtemp(prefix="mosaic-flwr-home-"))
        self.port = free_port()
        # Flower starts helper executables (flower-superexec, ...) by name: put this
        # interpreter's environment first on PATH, even when it is not activated.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home), "PATH": path}
        if ray_address:
            self.env["RAY_ADDRESS"] = ray_address
        self.process: subprocess.Popen | None = None
        self.log_path = self.home / "superlink.log"

    def __enter__(self) -> "LocalSuperLink":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Write the connection entry, start the SuperLink, wait until it answers."""
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n', encoding="utf-8")
        command = [_bin("flower-superlink"), "--insecure", "--simulation",
                   "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(self.port),
                   "--disable-runtime-dependency-installation"]
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(  # pylint: disable=consider-using-with
                command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + self.STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.process.returncode}; "
                                   f"see {self.log_path}")
            if self._answers():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"flower-superlink did not answer within {self.STARTUP_TIMEOUT}s")

    def _answers(self) -> bool:
        import httpx  # pylint: disable=import-outside-toplevel

        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=0.5).is_success
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Stop the SuperLink and every process it started (its whole session)."""
        if self.process is not None and self.process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.process = None
        shutil.rmtree(self.home, ignore_errors=True)

    def flwr(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this SuperLink."""
        return subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def run_status(self, run_id: int) -> str:
        """``finished:completed``, ``finished:failed``, ``running``, ... for one run."""
        result = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json",
                           timeout=60)
        try:
            payload = json.loads(result.stdout)
            return str(payload["runs"][0]["status"])
        except (ValueError, KeyError, IndexError) as err:
            raise RuntimeError(f"could not read the status of run {run_id}: "
                               f"{result.stdout or result.stderr}") from err


@dataclass
class SimulationOutcome:
    """How a simulated run ended, and where its results are."""

    run_id: int | None
    status: str
    run_dir: Path
    log: str

    @property
    def completed(self) -> bool:
        """True when the SuperLink reports ``finished:completed``."""
        return self.status == "finished:completed"

    @property
    def summary(self) -> dict[str, Any]:
        """The run's ``summary.json``."""
        return json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))


def toml_value(value: Any) -> str:
    """A Python value as a TOML literal for ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def resolve_overrides(overrides: dict[str, Any]) -> RunConfig:
    """The validated config a run with these ``--run-config`` overrides will use."""
    config = resolve_run_config({**RunConfig().to_mapping(), **overrides}, explicit=overrides)
    check_strategy(config)
    return config


def resume_overrides(run_dir: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """The ``--run-config`` values that continue the run in ``run_dir``: its own
    ``config.json``, ``resume-from`` set, and ``overrides`` on top. The checkpoint is
    read and checked here, so a folder that cannot be resumed fails in seconds
    (:class:`~mosaic_flwr.errors.ResumeError`)."""
    from .server import resume_point  # pylint: disable=import-outside-toplevel

    run_dir = run_dir.resolve()
    saved = run_dir / "config.json"
    if not saved.is_file():
        raise ResumeError(f"{saved}: no such file; --resume takes a run folder that "
                          f"mosaic-flwr wrote")
    try:
        values = json.loads(saved.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ResumeError(f"{saved}: not valid JSON ({err})") from None
    values = {**values, **overrides, "resume-from": str(run_dir)}
    values["output-dir"], values["run-name"] = str(run_dir.parent), run_dir.name
    resume_point(resolve_overrides(values))
    return values


def plan_run(overrides: dict[str, Any], output_dir: Path,
             validate: bool = True) -> tuple[Path, int, dict[str, Any]]:
    """Fill in output-dir and a unique run-name; return (run folder, clients, overrides).

    With ``validate`` the config is resolved and checked here, before Flower
    starts; without it the ServerApp is left to reject a bad config itself.
    """
    overrides = dict(overrides)
    overrides.setdefault("output-dir", str(output_dir.resolve()))
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    if not validate:
        overrides.setdefault("run-name", stamp)
        num_clients = overrides.get("num-clients", RunConfig.num_clients)
        return Path(overrides["output-dir"]) / overrides["run-name"], num_clients, overrides
    config = resolve_overrides(overrides)
    if not config.run_name:
        overrides["run-name"] = default_run_name(config, stamp)
    return Path(config.output_dir) / overrides["run-name"], config.num_clients, overrides


def simulate(overrides: dict[str, Any], *, superlink: LocalSuperLink | None = None,
             app_dir: Path = APP_DIR, output_dir: Path = Path("outputs"),
             cpus_per_client: int = 1, gpus_per_client: float = 0.0,
             num_supernodes: int | None = None, stream: bool = False,
             validate: bool = True) -> SimulationOutcome:
    """Run one simulation to its end and report its final status."""
    run_dir, num_clients, overrides = plan_run(overrides, output_dir, validate)
    if superlink is None:
        with LocalSuperLink() as own:
            return simulate(overrides, superlink=own, app_dir=app_dir, output_dir=output_dir,
                            cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
                            num_supernodes=num_supernodes, stream=stream, validate=validate)
    federation = (f"num-supernodes={num_supernodes or num_clients} "
                  f"client-resources-num-cpus={cpus_per_client} "
                  f"client-resources-num-gpus={float(gpus_per_client)}")
    command = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream",
               "--federation-config", federation]
    for key, value in overrides.items():
        command += ["--run-config", f"{key}={toml_value(value)}"]
    lines: list[str] = []
    with subprocess.Popen(command, env=superlink.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
        proc.wait()
    log_text = "".join(lines)
    run_id = _run_id(log_text)
    status = superlink.run_status(run_id) if run_id is not None else "not-started"
    if status != "finished:completed" and not (run_dir / "summary.json").is_file():
        # The ServerApp ended before its recorder could write (it failed early, or its
        # process died): the folder the launcher names still says what happened.
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(
            {"status": "failed", "error": _first_error(log_text) or f"run status {status}",
             "flower_status": status, "run_dir": str(run_dir)}, indent=2), encoding="utf-8")
    if run_dir.is_dir():  # appended: a resumed run keeps the log of its first part
        with (run_dir / "flwr.log").open("a", encoding="utf-8") as stream:
            stream.write(log_text)
    return SimulationOutcome(run_id, status, run_dir, log_text)


def _first_error(log_text: str) -> str:
    """The first ERROR line of a Flower log, without its level prefix and colours."""
    for line in log_text.splitlines():
        if "ERROR" in line:
            return re.sub(r"\x1b\[[0-9;]*m", "", line.split("ERROR", 1)[1]).lstrip(" :").strip()
    return ""


def _run_id(log_text: str) -> int | None:
    for line in log_text.splitlines():
        if "Successfully started run" in line:
            return int(line.rsplit(" ", 1)[-1].strip())
    return None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs with TOML values, as ``flwr run --run-config`` reads them; a
    value that is not TOML is a :class:`ConfigError` naming it."""
    import tomllib  # pylint: disable=import-outside-toplevel

    from flwr.common.config import parse_config_args  # pylint: disable=import-outside-toplevel

    try:
        return dict(parse_config_args(items)) if items else {}
    except Exception:  # Flower's message does not say which pair is wrong: find it
        for item in items:
            for pair in item.split():
                key, _, value = pair.partition("=")
                try:
                    tomllib.loads(f"x = {value}")
                except tomllib.TOMLDecodeError:
                    raise ConfigError("--run-config", pair, "the value is not TOML: quote "
                                      f"strings ({key}='{value}'), write booleans as true/false "
                                      "and numbers bare") from None
        raise ConfigError("--run-config", " ".join(items),
                          "must be space-separated key=value pairs with TOML values, e.g. "
                          "\"dataset='digits' seed=1\"") from None
