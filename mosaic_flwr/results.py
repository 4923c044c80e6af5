"""What a run leaves behind: metric files, a summary, a plot, progress lines, wandb.

:class:`RunRecorder` owns the run folder and the list of round records; the
orthogonal outputs are small callbacks (:class:`MetricsFile`,
:class:`ProgressLog`, :class:`WandbLogger`) that it calls after every round and
at the end, so strategies never touch files. Every round is appended to
``metrics.jsonl`` as soon as it ends: a run that fails later loses nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from logging import INFO
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from flwr.supercore import log

from .config import RunConfig
from .data.datasets import dataset_spec

DEFAULT_OUTPUT_DIR = Path.home() / "mosaic-flwr-outputs"


def default_run_name(config: RunConfig, stamp: str) -> str:
    """The run folder's name when ``run-name`` is empty: ``<stamp>-<strategy>-<dataset>-...``."""
    return f"{stamp}-{config.strategy}-{config.dataset}-{config.partitioner}-seed{config.seed}"


def make_run_dir(config: RunConfig) -> Path:
    """A fresh folder for this run's results (never overwrites an earlier run)."""
    base = Path(config.output_dir) if config.output_dir else DEFAULT_OUTPUT_DIR
    name = config.run_name or default_run_name(config, f"{datetime.now():%Y%m%d-%H%M%S}")
    run_dir, suffix = base / name, 1
    while run_dir.exists() and any(run_dir.iterdir()):
        suffix += 1
        run_dir = base / f"{name}-{suffix}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``summary.json``, or ``{}`` when it has none yet (the run is going
    on, or was killed)."""
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}


def run_status(run_dir: Path) -> str:
    """The ``status`` a run folder's ``summary.json`` records (``completed``, ``failed``),
    or ``""`` when it has none yet."""
    return str(read_summary(run_dir).get("status", ""))


class Callback:
    """Something that reacts to finished rounds and to the end of the run."""

    def on_round_end(self, record: dict[str, Any]) -> None:
        """Called with the round's record (round, accuracy, loss, seconds, ...)."""

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """Called once with the final summary."""


class MetricsFile(Callback):
    """Appends one JSON line per round to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_round_end(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")


class ProgressLog(Callback):
    """One log line per round with elapsed and estimated remaining time."""

    def __init__(self, num_rounds: int) -> None:
        self.num_rounds = num_rounds

    def on_round_end(self, record: dict[str, Any]) -> None:
        done = record["round"]
        elapsed = record["elapsed_seconds"]
        left = elapsed / done * (self.num_rounds - done)
        log(INFO, "[progress] round %d/%d  accuracy %.4f  loss %.4f  elapsed %.1fs  "
            "est. left %.1fs", done, self.num_rounds, record["accuracy"], record["loss"],
            elapsed, left)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        log(INFO, "[result] %s on %s (%s, alpha=%s, %d clients, seed %d): final accuracy "
            "%s, best %s, %.1fs, status %s; results in %s", summary["strategy"],
            summary["dataset"], summary["partitioner"], summary["dirichlet_alpha"],
            summary["num_clients"], summary["seed"], _fmt(summary["final_accuracy"]),
            _fmt(summary["best_accuracy"]), summary["wall_seconds"], summary["status"],
            summary["run_dir"])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class WandbLogger(Callback):
    """Logs the config and every round's metrics to Weights & Biases."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        import wandb  # pylint: disable=import-outside-toplevel

        self._wandb = wandb
        self.run = wandb.init(project=config.wandb_project, config=config.to_mapping(),
                              name=run_dir.name, dir=str(run_dir),
                              mode=config.wandb_mode or None, reinit="finish_previous")

    def on_round_end(self, record: dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                     step=record["round"])

    def on_run_end(self, summary: dict[str, Any]) -> None:
        for key in ("final_accuracy", "best_accuracy", "wall_seconds"):
            self.run.summary[key] = summary[key]
        self.run.summary["status"] = summary["status"]
        self.run.finish(exit_code=0 if summary["status"] == "completed" else 1)


def per_client_summary(accuracies: Sequence[float], prefix: str) -> dict[str, float]:
    """``{prefix}_mean``, ``_std`` (over clients) and ``_worst10`` (the mean over the
    lowest-scoring tenth of the clients, at least one) of per-client accuracies."""
    ordered = sorted(accuracies)
    mean = sum(ordered) / len(ordered)
    worst = ordered[:max(1, math.ceil(len(ordered) / 10))]
    return {f"{prefix}_mean": mean,
            f"{prefix}_std": math.sqrt(sum((a - mean) ** 2 for a in ordered) / len(ordered)),
            f"{prefix}_worst10": sum(worst) / len(worst)}


class RunRecorder:
    """Collects round records and writes ``partitions.json``, ``summary.json``, ``accuracy.png``."""

    def __init__(self, run_dir: Path, config: RunConfig,
                 callbacks: list[Callback] | None = None,
                 resumed: dict[str, Any] | None = None) -> None:
        self.run_dir = run_dir
        self.config = config
        self.rounds: list[dict[str, Any]] = []
        self.initial: dict[str, float] | None = None
        #: Seconds the ServerApp spent before round 0 (config, data, partitions, strategy).
        self.setup_seconds: float | None = None
        #: The round each resumption of this run started after (empty for a run never resumed).
        self.resumed_from: list[int] = []
        self.num_clients = config.num_clients
        self._start = time.monotonic()
        if resumed is None:
            (run_dir / "config.json").write_text(json.dumps(config.to_mapping(), indent=2))
        else:
            self._continue(resumed)
        self._last = time.monotonic()
        self.callbacks = callbacks if callbacks is not None else default_callbacks(config, run_dir)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the records (:mod:`mosaic_flwr.checkpoint`)."""
        return {"rounds": self.rounds, "initial": self.initial,
                "resumed_from": self.resumed_from,
                "elapsed_seconds": time.monotonic() - self._start}

    def _continue(self, state: dict[str, Any]) -> None:
        """Take over a checkpoint's records: ``metrics.jsonl`` is rewritten to hold exactly
        the checkpoint's rounds (a round that ended after the checkpoint is run again)."""
        self.rounds = list(state["rounds"])
        self.initial = state["initial"]
        self.resumed_from = [*state["resumed_from"], self.rounds[-1]["round"]]
        self._start -= state["elapsed_seconds"]  # elapsed time goes on from the checkpoint's
        metrics = self.run_dir / "metrics.jsonl"
        tmp = metrics.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rounds), encoding="utf-8")
        os.replace(tmp, metrics)

    def write_partitions(self, counts: np.ndarray, partitioner: str) -> None:
        """Per-client label counts, saved before training starts."""
        payload = {"partitioner": partitioner,
                   "clients": [{"partition_id": i, "num_examples": int(row.sum()),
                                "label_counts": [int(c) for c in row]}
                               for i, row in enumerate(counts)]}
        (self.run_dir / "partitions.json").write_text(json.dumps(payload, indent=2))

    def on_initial(self, accuracy: float, loss: float) -> None:
        """The global model's score before any training."""
        self.initial = {"accuracy": accuracy, "loss": loss}
        self._last = time.monotonic()

    def on_round_end(self, server_round: int, accuracy: float, loss: float,
                     **extra: Any) -> dict[str, Any]:
        """Record a finished round and pass it to every callback."""
        now = time.monotonic()
        record = {"round": server_round, "accuracy": accuracy, "loss": loss,
                  "seconds": now - self._last, "elapsed_seconds": now - self._start, **extra}
        self._last = now
        self.rounds.append(record)
        for callback in self.callbacks:
            callback.on_round_end(record)
        return record

    def finish(self, status: str = "completed", error: str = "") -> dict[str, Any]:
        """Write ``summary.json`` and ``accuracy.png``; return the summary."""
        accuracies = [r["accuracy"] for r in self.rounds]
        last = self.rounds[-1] if self.rounds else {}
        config = self.config
        summary = {
            "status": status, "error": error, "run_dir": str(self.run_dir),
            "strategy": config.strategy, "dataset": config.dataset,
            "data": _data_facts(config),
            "partitioner": config.partitioner, "dirichlet_alpha": config.dirichlet_alpha,
            "num_clients": self.num_clients, "seed": config.seed, "model": config.model,
            "num_server_rounds": config.num_server_rounds,
            "initial_accuracy": self.initial["accuracy"] if self.initial else None,
            "final_accuracy": accuracies[-1] if accuracies else None,
            "best_accuracy": max(accuracies) if accuracies else None,
            # The final global model on each client's own test split, and (for methods
            # that keep them) the clients' personalised models there.
            **{f"final_{name}": {k: last[f"{name}_{k}"] for k in ("mean", "std", "worst10")
                                 if f"{name}_{k}" in last} or None
               for name in ("personal_accuracy", "personalised_accuracy")},
            "wall_seconds": time.monotonic() - self._start,
            "setup_seconds": self.setup_seconds,
            "resumed_from_rounds": self.resumed_from,
            "rounds": [{k: r[k] for k in ("round", "accuracy", "loss", "seconds")}
                       for r in self.rounds],
            "config": config.to_mapping(),
        }
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.rounds:
            plot_rounds(self.rounds, self.run_dir / "accuracy.png",
                        title=f"{config.strategy} on {config.dataset} ({config.partitioner})")
        for callback in self.callbacks:
            callback.on_run_end(summary)
        return summary


def default_callbacks(config: RunConfig, run_dir: Path) -> list[Callback]:
    """The metrics file and progress lines, plus wandb when ``wandb=true``."""
    callbacks: list[Callback] = [MetricsFile(run_dir / "metrics.jsonl"),
                                 ProgressLog(config.num_server_rounds)]
    if config.wandb:
        callbacks.append(WandbLogger(config, run_dir))
    return callbacks


def plot_rounds(rounds: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Accuracy and loss per round, side by side."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    x = [r["round"] for r in rounds]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(x, [r["accuracy"] for r in rounds], marker="o")
    ax_acc.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1))
    ax_loss.plot(x, [r["loss"] for r in rounds], marker="o", color="tab:red")
    ax_loss.set(xlabel="round", ylabel="test loss")
    for axis in (ax_acc, ax_loss):
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _data_facts(config: RunConfig) -> dict[str, Any]:
    """The data's shape, classes and normalisation (read from the data unless registered);
    empty when it could not be loaded (the run's error says why)."""
    try:
        return dataset_spec(config).facts()
    except Exception:  # pylint: disable=broad-exception-caught
        return {}
