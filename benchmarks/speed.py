"""Benchmark: every method's wall time, phases, memory and accuracy, side by side.

Runs each method once per seed through ``flwr run`` on one private SuperLink,
interleaved (seed 0: every method, then seed 1, ...), so that all methods see
the same machine load, partitions, models, round budgets and seeds. Prints,
per method (mean and spread over seeds):

- ``wall s``: the whole ``flwr run`` as the user waits for it; ``x FedAvg``:
  its ratio to FedAvg's wall time on the same seed (needs ``fedavg`` among the
  methods);
- per phase, in seconds summed over rounds: ``train`` local training and
  ``gen`` client generator training (each the slowest client per round: the
  wall-clock share with enough parallel workers), ``protos`` prototypes and
  probe heads (slowest client), ``meta`` experts + meta model and ``distill``
  the server's distillation (or the method's server step), ``synth`` synthetic
  data (FedCOG's client synthesis, slowest client; DENSE's server synthesis,
  part of its ``distill``), ``start-up`` the
  wall time outside the rounds (app start, Ray, SuperLink calls), ``round 1
  extra`` round 1 minus the mean later round of FedAvg (actor start, imports,
  data loading in the actors);
- ``peak GB``: the largest total resident memory of the SuperLink's process
  tree (SuperLink, simulation, Ray, actors), sampled every 0.2 s;
- ``final acc``; and for Mosaic the distillation round's student accuracy
  before and after distillation and the teacher's accuracy.

The default setting is the one of ``docs/results/speed.md``: MNIST 12k train /
2k test images (``benchmarks/prepare_mnist.py --train-size 12000 --test-size
2000``), Dirichlet(0.1) over 10 clients, 5 rounds x 5 local epochs, Mosaic
3 warm-up + 1 distillation + 1 fine-tuning round (the ``digits-few-rounds``
preset on MNIST). ``--device cuda --gpus-per-client 0.1`` runs it on a GPU
(``benchmarks/gpu.sh``); ``--smoke`` shrinks everything to a seconds-long run
for CI.

Examples::

    python benchmarks/prepare_mnist.py --out data/mnist-12k --train-size 12000 --test-size 2000
    python benchmarks/speed.py --data-path data/mnist-12k --methods fedavg mosaic --seeds 0 1 2
    python benchmarks/speed.py --data-path data/mnist-12k --methods fedavg fedgen fedftg dense feddf fedcog
    python benchmarks/speed.py --smoke --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulation_time import PeakMemory  # noqa: E402  pylint: disable=wrong-import-position

from mosaic_flwr.compare import METHODS  # noqa: E402  pylint: disable=wrong-import-position
from mosaic_flwr.simulation import (LocalSuperLink, parse_overrides,  # noqa: E402  pylint: disable=wrong-import-position
                                    simulate)

#: The benchmark's setting (the ``digits-few-rounds`` preset on MNIST).
SETTING = {"preset": "digits-few-rounds", "dataset": "mnist"}

#: A CI-sized setting: digits, 4 clients, 2 short rounds (Mosaic: warm-up, distillation).
SMOKE = {"preset": "digits-few-rounds", "dataset": "digits", "num-clients": 4,
         "num-server-rounds": 2, "local-epochs": 1, "mosaic-warmup-rounds": 1,
         "mosaic-generator-steps": 5, "mosaic-meta-epochs": 2, "mosaic-distill-steps": 5,
         "mosaic-distill-pool-batches": 2, "mosaic-prototypes-per-class": 2}

#: Phase columns: (title, metrics summed over every round of ``metrics.jsonl``).
PHASES = (
    ("train", ("train_seconds_max",)),
    ("gen", ("generator_seconds_max",)),
    ("protos", ("stats_seconds_max",)),
    ("meta", ("experts_seconds", "meta_seconds")),
    ("distill", ("distill_seconds",)),
    ("synth", ("fedcog_seconds_max", "synthesis_seconds")),
)

#: Mosaic's distillation-round diagnostics (read from its round record).
MOSAIC_STATS = ("student_accuracy_before", "student_accuracy_after", "teacher_accuracy",
                "distill_share")


def run_once(link: LocalSuperLink, overrides: dict, output_dir: Path,
             gpus_per_client: float) -> dict:
    """One ``flwr run``: wall time, peak memory, phases and accuracies."""
    assert link.process is not None
    start = time.monotonic()
    with PeakMemory(link.process.pid) as memory:
        outcome = simulate(overrides, superlink=link, output_dir=output_dir,
                           gpus_per_client=gpus_per_client)
    wall = time.monotonic() - start
    if not outcome.completed:
        raise SystemExit(f"{overrides}: run ended {outcome.status}\n{outcome.log[-3000:]}")
    rounds = [json.loads(line) for line in
              (outcome.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rounds if r.get("round", 0) >= 1]
    row = {"wall": wall, "peak_gb": memory.peak / 1e9,
           "final_acc": outcome.summary["final_accuracy"],
           "round_seconds": [r["seconds"] for r in rounds],
           "start_up": wall - sum(r["seconds"] for r in rounds)}
    for title, names in PHASES:
        row[title] = sum(r.get(name, 0.0) for r in rounds for name in names)
    for name in MOSAIC_STATS:
        values = [r[name] for r in rounds if name in r]
        if values:
            row[name] = values[0]
    return row


def summarise(rows: dict[str, list[dict]]) -> list[dict]:
    """Per method: mean and sample std over seeds of every number, plus ratios."""
    fedavg = rows.get("fedavg")
    later = ([statistics.mean(r["round_seconds"][1:]) for r in fedavg]
             if fedavg and len(fedavg[0]["round_seconds"]) > 1 else None)
    table = []
    for method, runs in rows.items():
        stats: dict = {"method": method, "seeds": len(runs)}
        keys = ["wall", "start_up", *(t for t, _ in PHASES), "peak_gb", "final_acc",
                *(k for k in MOSAIC_STATS if k in runs[0])]
        for key in keys:
            values = [r[key] for r in runs]
            stats[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        if fedavg:
            ratios = [r["wall"] / f["wall"] for r, f in zip(runs, fedavg)]
            stats["x_fedavg"] = (statistics.mean(ratios),
                                 statistics.stdev(ratios) if len(ratios) > 1 else 0.0)
        if later:
            extra = [r["round_seconds"][0] - lat for r, lat in zip(runs, later)]
            stats["round1_extra"] = (statistics.mean(extra),
                                     statistics.stdev(extra) if len(extra) > 1 else 0.0)
        stats["per_seed_acc"] = [round(r["final_acc"], 4) for r in runs]
        table.append(stats)
    return table


def markdown(table: list[dict]) -> str:
    """The summary as a markdown table: ``mean ± std`` per cell."""
    columns = [("wall s", "wall", 1), ("x FedAvg", "x_fedavg", 2), ("start-up s", "start_up", 1),
               ("round 1 extra s", "round1_extra", 1)] + [
        (f"{t} s", t, 1) for t, _ in PHASES] + [
        ("peak GB", "peak_gb", 2), ("final acc", "final_acc", 4),
        ("student before", "student_accuracy_before", 4),
        ("student after", "student_accuracy_after", 4), ("teacher", "teacher_accuracy", 4),
        ("share kept", "distill_share", 2)]
    lines = ["| method | seeds | " + " | ".join(c[0] for c in columns) + " | final acc per seed |",
             "|---|---" + "|---" * len(columns) + "|---|"]
    for stats in table:
        cells = []
        for _, key, digits in columns:
            if key in stats:
                mean, std = stats[key]
                cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if stats["seeds"] > 1
                             else f"{mean:.{digits}f}")
            else:
                cells.append("")
        lines.append(f"| {stats['method']} | {stats['seeds']} | " + " | ".join(cells)
                     + f" | {stats['per_seed_acc']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--methods", nargs="+", default=["fedavg", "mosaic"],
                        help="named methods (mosaic-flwr compare's) or label:key=value ...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-path", default="", help="the MNIST save_to_disk folder")
    parser.add_argument("-c", "--run-config", action="append", default=[],
                        help="extra overrides for every run (key=value, TOML values)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long CI-sized run")
    parser.add_argument("--json", type=Path, help="also write every run and the summary here")
    args = parser.parse_args(argv)
    if not args.smoke and not args.data_path:
        parser.error("--data-path is required (see benchmarks/prepare_mnist.py), or use --smoke")
    base = dict(SMOKE if args.smoke else {**SETTING, "data-path": str(Path(args.data_path).resolve())})
    base.update(device=args.device, **parse_overrides(args.run_config))
    methods = {}
    for text in args.methods:
        label, _, spec = text.partition(":")
        methods[label] = parse_overrides(spec.split()) if spec else dict(METHODS[label])
    rows: dict[str, list[dict]] = {label: [] for label in methods}
    with tempfile.TemporaryDirectory() as out, LocalSuperLink() as link:
        for seed in args.seeds:
            for label, overrides in methods.items():
                row = run_once(link, {**base, **overrides, "seed": seed}, Path(out),
                               args.gpus_per_client)
                rows[label].append(row)
                print(f"seed {seed} {label}: {row['wall']:.1f} s, final acc "
                      f"{row['final_acc']:.4f}, peak {row['peak_gb']:.2f} GB", flush=True)
    table = summarise(rows)
    print(f"\nsetting: {base}; seeds {args.seeds}; gpus per client {args.gpus_per_client}\n")
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps({"setting": base, "seeds": args.seeds, "runs": rows,
                                         "summary": table}, indent=2))


if __name__ == "__main__":
    main()
