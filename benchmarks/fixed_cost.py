"""Benchmark: where the fixed cost of one ``flwr run`` goes, and which part is ours.

Runs a short FedAvg simulation (2 rounds x 1 local epoch; the benchmark's
MNIST setting by default) on a private SuperLink, time-stamps every line of
``flwr run``'s output as it arrives, and prints:

- the launcher: from starting ``flwr run`` to "Successfully started run"
  (Flower's CLI packs and installs the app);
- the simulation start: to the ServerApp's first line (the simulation
  process, Ray's start);
- the ServerApp's set-up (ours: config, data, partitions, evaluator, strategy),
  as it logs it;
- round 1's extra time over round 2 (Ray actors start and import, then each
  actor's first message loads and partitions the data: ``setup-seconds`` of the
  clients, ours) and the end (results, plot, shutdown);
- the import time of the ClientApp in a fresh interpreter, split into torch,
  flwr and this project's own modules (``python -X importtime``).

Lines arrive through Flower's log stream, which batches them, so the stamps
are good to about a second. Example::

    python benchmarks/fixed_cost.py --data-path data/mnist-12k
    python benchmarks/fixed_cost.py   # digits
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mosaic_flwr.simulation import APP_DIR, CONNECTION, LocalSuperLink, _bin, plan_run, toml_value

SETTING = {"strategy": "fedavg", "partitioner": "dirichlet", "dirichlet-alpha": 0.1,
           "num-clients": 10, "num-server-rounds": 2, "local-epochs": 1}


def stamped_run(link: LocalSuperLink, overrides: dict, output_dir: Path) -> tuple[list, Path, float]:
    """``flwr run`` with every output line time-stamped (seconds since launch)."""
    run_dir, num_clients, overrides = plan_run(overrides, output_dir)
    command = [_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--federation-config",
               f"num-supernodes={num_clients} client-resources-num-cpus=1"]
    for key, value in overrides.items():
        command += ["--run-config", f"{key}={toml_value(value)}"]
    start = time.monotonic()
    lines = []
    with subprocess.Popen(command, env=link.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip()))
    return lines, run_dir, time.monotonic() - start


def first(lines: list, pattern: str) -> tuple[float, str]:
    """The first (time, line) whose line matches ``pattern``."""
    for stamp, line in lines:
        if re.search(pattern, line):
            return stamp, line
    raise SystemExit(f"no output line matched {pattern!r}")


def import_split() -> dict[str, float]:
    """Seconds to import the ClientApp in a fresh interpreter, by top-level package."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import client_app.app"],
                            capture_output=True, text=True, check=True, cwd=APP_DIR)
    split: dict[str, float] = {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if match:
            package = match.group(2).split(".")[0]
            group = package if package in ("torch", "flwr", "mosaic_flwr", "client_app") else "other"
            split[group] = split.get(group, 0.0) + int(match.group(1)) / 1e6
    return split


def main() -> None:
    """Run the benchmark and print the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data-path", default="", help="MNIST save_to_disk folder (else digits)")
    args = parser.parse_args()
    overrides = dict(SETTING, dataset="mnist", **{"data-path": str(Path(args.data_path).resolve())}) \
        if args.data_path else dict(SETTING, dataset="digits")
    with tempfile.TemporaryDirectory() as out, LocalSuperLink() as link:
        lines, run_dir, wall = stamped_run(link, overrides, Path(out))
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    started, _ = first(lines, r"Successfully started run")
    server_first, _ = first(lines, r"Results go to")
    _, setup_line = first(lines, r"ServerApp set-up")
    server_setup = float(re.search(r"([\d.]+) s", setup_line).group(1))
    r1, r2 = rounds[0], rounds[1]
    imports = import_split()
    rows = [
        ("launcher: flwr run until the run starts (Flower)", started),
        ("simulation process and Ray start, until the ServerApp logs (Flower, Ray)",
         server_first - started - server_setup),
        ("ServerApp set-up: config, data, partitions, evaluator, strategy (ours)", server_setup),
        ("round 1 minus round 2 (actor start and imports, first-message set-up)",
         r1["seconds"] - r2["seconds"]),
        ("  of which the slowest client's first-message set-up (ours)", r1.get("setup_seconds_max", 0.0)),
        ("  a later message's set-up, slowest client (ours)", r2.get("setup_seconds_max", 0.0)),
        ("after the last round: results, plot, shutdown", wall - server_first - r2["elapsed_seconds"]),
        ("whole flwr run", wall),
    ]
    print(f"setting: {overrides}")
    print("| part | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")
    print("\nimport of the ClientApp in a fresh interpreter (seconds, self time by package): "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(imports.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
