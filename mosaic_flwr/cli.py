"""The ``mosaic-flwr`` command: ``simulate``, ``compare`` and ``local-only``.

Only argument parsing lives here; it imports nothing heavy, so ``--help``
answers at once. Process control (a private SuperLink, ``flwr run``) is in
:mod:`mosaic_flwr.simulation`, the comparison in :mod:`mosaic_flwr.compare`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ConfigError, DatasetUnavailableError, ResumeError

RAY_ADDRESS_HELP = ("join an existing Ray cluster (host:port of `ray start --head`) instead of "
                    "starting a local one")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mosaic-flwr`` command."""
    parser = argparse.ArgumentParser(prog="mosaic-flwr", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run one simulation and check that it completed")
    sim.add_argument("-c", "--run-config", action="append", default=[],
                     help="run-config overrides, TOML values: \"dataset='digits' seed=1\"")
    sim.add_argument("--output-dir", type=Path, default=Path("outputs"),
                     help="base folder for results unless output-dir is in --run-config "
                          "(default: ./outputs)")
    sim.add_argument("--cpus-per-client", type=int, default=1)
    sim.add_argument("--gpus-per-client", type=float, default=0.0,
                     help="fraction of a GPU per virtual client, e.g. 0.25 (needs CUDA)")
    sim.add_argument("--app", type=Path, default=None,
                     help="Flower app folder (default: this project's)")
    sim.add_argument("--ray-address", default="", metavar="ADDRESS", help=RAY_ADDRESS_HELP)
    sim.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue a stopped run from its newest checkpoint, with the run's "
                          "own configuration (RUN_DIR/config.json); -c may change only how it is "
                          "watched (round-timeout, node-wait-timeout, wandb-*, server-threads, "
                          "checkpoint-keep)")
    cmp_ = sub.add_parser("compare", help="run several methods over seeds (and alphas) and "
                                          "write comparison.md/.csv/.png")
    cmp_.add_argument("--methods", nargs="+", default=["fedavg", "mosaic"],
                      help="named methods (fedavg, fedprox, mosaic, mosaic-no-meta, "
                           "mosaic-noise-inputs, mosaic-uniform-experts, mosaic-no-distill) or "
                           "'label:key=value key=value'")
    cmp_.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cmp_.add_argument("--alphas", type=float, nargs="+", default=None,
                      help="Dirichlet alphas to sweep (default: the run config's)")
    cmp_.add_argument("-c", "--run-config", action="append", default=[],
                      help="run-config values shared by every method, TOML values")
    cmp_.add_argument("--output-dir", type=Path, default=Path("outputs/comparison"),
                      help="where runs and report go; the same command into the same folder "
                           "keeps completed runs and continues stopped ones")
    cmp_.add_argument("--cpus-per-client", type=int, default=1)
    cmp_.add_argument("--gpus-per-client", type=float, default=0.0)
    cmp_.add_argument("--ray-address", default="", metavar="ADDRESS", help=RAY_ADDRESS_HELP)
    local = sub.add_parser("local-only", help="the no-federation reference: every client "
                                              "trains its own model alone")
    local.add_argument("-c", "--run-config", action="append", default=[],
                       help="run-config values (data, partitions, client-models, budget)")
    local.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    local.add_argument("--output-dir", type=Path, default=Path("outputs/local-only"))
    args = parser.parse_args(argv)
    if args.command == "compare":
        return _compare(args)
    if args.command == "local-only":
        return _local_only(args)
    return _simulate(args)


def _simulate(args: argparse.Namespace) -> int:
    # Imported per command, so that --help needs none of it.
    from .preflight import preflight  # pylint: disable=import-outside-toplevel
    from .simulation import (  # pylint: disable=import-outside-toplevel
        APP_DIR, LocalSuperLink, parse_overrides, resolve_overrides, resume_overrides, simulate)

    try:  # a mistake fails here, in seconds, before the SuperLink starts
        overrides = parse_overrides(args.run_config)
        if args.resume is not None:
            overrides = resume_overrides(args.resume, overrides)
        overrides.setdefault("output-dir", str(args.output_dir.resolve()))
        preflight(resolve_overrides(overrides), args.gpus_per_client)
        with LocalSuperLink(ray_address=args.ray_address) as link:
            outcome = simulate(overrides, superlink=link, app_dir=args.app or APP_DIR,
                               output_dir=args.output_dir, cpus_per_client=args.cpus_per_client,
                               gpus_per_client=args.gpus_per_client, stream=True)
    except (ConfigError, ResumeError, DatasetUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\nrun {outcome.run_id}: {outcome.status}; results in {outcome.run_dir}")
    if outcome.completed:
        summary = outcome.summary
        print(f"final accuracy {summary['final_accuracy']:.4f}, best "
              f"{summary['best_accuracy']:.4f}, {summary['wall_seconds']:.1f}s")
        return 0
    return 1


def _compare(args: argparse.Namespace) -> int:
    from .compare import parse_method, plan_comparison, run_comparison  # pylint: disable=import-outside-toplevel
    from .preflight import preflight  # pylint: disable=import-outside-toplevel
    from .simulation import parse_overrides, resolve_overrides  # pylint: disable=import-outside-toplevel

    try:  # every run's config and what is on disk already: fails in seconds, before any run
        base = parse_overrides(args.run_config)
        plan = plan_comparison([parse_method(text) for text in args.methods], args.seeds,
                               args.alphas or [None], base, args.output_dir)
        for run in plan:
            if run.state != "completed":
                preflight(resolve_overrides(run.overrides), args.gpus_per_client)
    except (ConfigError, ValueError, DatasetUnavailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = run_comparison(plan, base, args.output_dir, args.cpus_per_client,
                          args.gpus_per_client, args.ray_address)
    report = (args.output_dir / "comparison.md").resolve()
    print(report.read_text(encoding="utf-8"))
    print(f"report: {report}")
    return 0 if all(row["status"] == "finished:completed" for row in rows) else 1


def _local_only(args: argparse.Namespace) -> int:
    from .local_only import (local_only, personal_summary,  # pylint: disable=import-outside-toplevel
                             summarise, write_csv)
    from .simulation import parse_overrides, resolve_overrides  # pylint: disable=import-outside-toplevel

    try:
        base = resolve_overrides(parse_overrides(args.run_config))
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = []
    for seed in args.seeds:
        rows += local_only(base.replace(seed=seed))
        print(f"[local-only] seed {seed} done")
    write_csv(rows, args.output_dir / "local-only.csv")
    print("| client model | local-only test accuracy (mean ± std over seeds) | seeds |")
    print("|---|---|---|")
    for model, (mean, spread, count) in summarise(rows).items():
        print(f"| {model} | {mean:.4f} ± {spread:.4f} | {count} |")
    mean, spread, worst = personal_summary(rows)
    print(f"each client on its own test split: mean {mean:.4f} ± {spread:.4f} over seeds, "
          f"worst decile {worst:.4f}")
    print(f"rows: {(args.output_dir / 'local-only.csv').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
