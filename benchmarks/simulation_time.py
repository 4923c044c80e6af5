"""Benchmark: wall time, round time, accuracy and memory of simulated runs.

Runs ``mosaic-flwr simulate`` once per seed on one private SuperLink and prints
one row per run plus mean and standard deviation:

- ``run s``: the whole ``flwr run`` (app start, Ray actors, all rounds);
- ``round 1 s``: the first round, which includes starting the Ray actors;
- ``later round s``: mean of the other rounds (the steady state);
- ``peak GB``: the largest total resident memory of the SuperLink's process
  tree (SuperLink, simulation runtime, Ray, actors), sampled every 0.2 s from
  /proc (Linux only).

For Mosaic runs a second table splits the time into its parts, from the
run's ``metrics.jsonl``: local training (summed over clients and rounds, and
the slowest client per round summed over rounds: the wall-clock share with
enough parallel workers), generator training and prototypes (same two views),
building the experts plus training the meta model, and distillation (server).

Examples::

    python benchmarks/simulation_time.py --seeds 0 1 2
    python benchmarks/simulation_time.py --seeds 0 1 2 -c "partitioner='dirichlet' dirichlet-alpha=0.1"
    python benchmarks/simulation_time.py --seeds 0 --gpus-per-client 0.1   # on a CUDA machine
    python benchmarks/simulation_time.py --seeds 0 1 2 -c "strategy='mosaic' partitioner='dirichlet' dirichlet-alpha=0.1"
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from mosaic_flwr.simulation import LocalSuperLink, parse_overrides, simulate


def tree_rss_bytes(root_pid: int) -> int:
    """Total resident memory of ``root_pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples a process tree's memory in a background thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


#: Columns of the time-split table: (title, metric names summed over all rounds).
SPLIT = (
    ("train sum s", ("train_seconds_sum",)),
    ("train max s", ("train_seconds_max",)),
    ("gen sum s", ("generator_seconds_sum",)),
    ("gen max s", ("generator_seconds_max",)),
    ("protos sum s", ("stats_seconds_sum",)),
    ("meta s", ("experts_seconds", "meta_seconds")),
    ("distill s", ("distill_seconds",)),
)


def time_split(run_dir: Path) -> dict[str, float]:
    """Seconds per part of the run, summed over the rounds of ``metrics.jsonl``."""
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {title: sum(r.get(name, 0.0) for r in rounds for name in names)
            for title, names in SPLIT}


def print_table(header: tuple[str, ...], rows: list[dict]) -> None:
    """Rows of numbers under a header, then mean and std when there are several rows."""
    print(" | ".join(f"{h:>13}" for h in header))
    for row in rows:
        print(" | ".join(f"{v:>13.4f}" if isinstance(v, float) else f"{v:>13}" for v in row.values()))
    if len(rows) > 1:
        for label, fn in (("mean", statistics.mean), ("std", statistics.stdev)):
            values = [fn([r[k] for r in rows]) for k in list(rows[0])[1:]]
            print(" | ".join([f"{label:>13}"] + [f"{v:>13.4f}" for v in values]))


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("-c", "--run-config", action="append", default=[])
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()
    overrides = parse_overrides(args.run_config)
    rows, splits = [], []
    with tempfile.TemporaryDirectory() as out, LocalSuperLink() as link:
        for seed in args.seeds:
            assert link.process is not None
            start = time.monotonic()
            with PeakMemory(link.process.pid) as memory:
                outcome = simulate({**overrides, "seed": seed}, superlink=link,
                                   output_dir=Path(out), gpus_per_client=args.gpus_per_client)
            wall = time.monotonic() - start
            if not outcome.completed:
                raise SystemExit(f"seed {seed}: run ended {outcome.status}\n{outcome.log[-3000:]}")
            rounds = outcome.summary["rounds"]
            later = [r["seconds"] for r in rounds[1:]]
            rows.append({"seed": seed, "final_accuracy": outcome.summary["final_accuracy"],
                         "run_seconds": wall, "round1_seconds": rounds[0]["seconds"],
                         "later_round_seconds": statistics.mean(later) if later else float("nan"),
                         "peak_gb": memory.peak / 1e9})
            splits.append({"seed": seed, **time_split(outcome.run_dir)})
    print(f"overrides: {overrides or '(defaults)'}; gpus per client: {args.gpus_per_client}")
    print_table(("seed", "final acc", "run s", "round 1 s", "later round s", "peak GB"), rows)
    if any(v for split in splits for k, v in split.items() if k.startswith(("gen", "distill"))):
        print("\ntime split (seconds, summed over rounds; 'sum' = all clients, 'max' = slowest "
              "client per round)")
        print_table(("seed",) + tuple(title for title, _ in SPLIT), splits)
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "time_split": splits}, indent=2))


if __name__ == "__main__":
    main()
