"""The ServerApp's work: validate, set up, run the strategy, record the results.

``server_app/app.py`` only hands Flower's ``Grid`` and ``Context`` to
:func:`run_server`. Everything that can be checked before training (the
configuration, the data set, the partitions, the federation size) is checked
first, so a mistake ends the run as failed with one clear log line. After every
round a checkpoint goes to the run folder, and ``resume-from`` continues a run
from its newest one (:mod:`mosaic_flwr.checkpoint`).
"""

from __future__ import annotations

import os
import random
import time
from logging import ERROR, INFO
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from .checkpoint import (latest_checkpoint, load_checkpoint, restore_rng_states, rng_states,
                         save_final_model, write_checkpoint)
from .client_models import global_model_spec
from .config import RunConfig, resolve_run_config
from .data import BatchTransform, client_test_splits, label_counts, load_data, partitions_for
from .errors import ConfigError, DatasetUnavailableError, FederationTooSmallError, ResumeError
from .preflight import check_device, check_output_dir
from .results import RunRecorder, make_run_dir, per_client_summary, run_status
from .strategies import build_strategy, check_strategy
from .training import evaluate_predictor, fast_layout, score_samples, select_device


def load_config(grid: Grid, context: Context) -> RunConfig:
    """The validated config (app defaults < preset < values passed with --run-config),
    checked against what its strategy can run."""
    run = getattr(grid, "run", None)
    explicit = getattr(run, "override_config", None)
    config = resolve_run_config(context.run_config, explicit)
    check_strategy(config)
    return config


def wait_for_nodes(grid: Grid, config: RunConfig) -> int:
    """Block until ``num-clients`` nodes are connected, or fail after the timeout."""
    deadline = time.monotonic() + config.node_wait_timeout
    while (connected := len(list(grid.get_node_ids()))) < config.num_clients:
        if time.monotonic() > deadline:
            raise FederationTooSmallError(
                f"only {connected} SuperNodes connected after {config.node_wait_timeout:.0f}s "
                f"but num-clients={config.num_clients}; in simulation pass --federation-config "
                f"\"num-supernodes={config.num_clients}\" (mosaic-flwr simulate does), in "
                f"deployment start {config.num_clients} SuperNodes")
        time.sleep(0.5)
    return connected


class CentralEvaluator:
    """Scores global arrays on the held-out test split (Flower's ``evaluate_fn``), as a
    whole and on each client's personal test split (:func:`~mosaic_flwr.data.client_test_splits`)."""

    def __init__(self, config: RunConfig) -> None:
        data = load_data(config)
        self.config = config
        self.device = select_device(config.device)
        self.model = global_model_spec(config).build(data.spec)
        self.transform = BatchTransform(data.spec, self.device)
        self.images = torch.from_numpy(data.test_images).to(self.device)  # once, kept compact
        self.labels = torch.from_numpy(data.test_labels).to(self.device)
        self.client_splits = [torch.from_numpy(split).to(self.device)
                              for split in client_test_splits(config)]
        #: The last call's personal accuracy statistics (:func:`personal_accuracy`).
        self.personal: dict[str, float] = {}

    def __call__(self, arrays: ArrayRecord) -> tuple[float, float]:
        """(loss, accuracy) of the global model described by ``arrays``; the statistics of
        its accuracy on the clients' personal test splits go to :attr:`personal`."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        fast_layout(self.model.to(self.device)).eval()
        losses, correct = score_samples(self.model, self.images, self.labels, self.transform,
                                        self.device, amp=self.config.amp)
        self.personal = personal_accuracy(correct, self.client_splits)
        return float(losses.sum()) / len(losses), int(correct.sum()) / len(correct)

    def score(self, predict: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Test accuracy of any predictor, e.g. Mosaic's teacher (reporting only)."""
        _, accuracy = evaluate_predictor(predict, self.images, self.labels, self.transform,
                                         self.device, amp=self.config.amp)
        return accuracy


def personal_accuracy(correct: torch.Tensor, splits: list[torch.Tensor]) -> dict[str, float]:
    """:func:`~mosaic_flwr.results.per_client_summary` of per-client accuracy
    (``personal_accuracy_*``), each client scored on its own split (``correct``: per test
    sample; clients with an empty split are left out)."""
    accuracies = torch.stack([correct[s].double().mean() for s in splits if len(s)])
    return per_client_summary(accuracies.cpu().tolist(), "personal_accuracy")


def message_config(config: RunConfig, run_dir: Path | None = None) -> ConfigRecord:
    """What every instruction carries of the run config (the ``config`` ConfigRecord).

    Only the core keys: a method's settings travel in the ``task`` record of the
    rounds that need them (:class:`~mosaic_flwr.records.TrainTask`). With
    ``run_dir``, also ``run-folder``: where the nodes' state is saved, or under
    which name (:mod:`mosaic_flwr.node_state`).
    """
    values = config.core_mapping()
    if run_dir is not None:
        values["run-folder"] = str(run_dir.resolve())
    return ConfigRecord(values)


def server_threads(config: RunConfig) -> int:
    """The ServerApp's torch threads: ``server-threads``, or every core this process may
    use (its CPU affinity) when 0. In a simulation the clients are idle while the
    server step runs, so its distillation may use every core."""
    if config.server_threads:
        return config.server_threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_server(grid: Grid, context: Context) -> dict:
    """Run one experiment end to end (or continue one, with ``resume-from``) and return
    its summary."""
    start = time.monotonic()
    try:
        config = load_config(grid, context)
        resumed = resume_point(config)
        check_device(config.device)
        if resumed is None:
            check_output_dir(config)
        data = load_data(config)
        partitions = partitions_for(config)
    except (ConfigError, DatasetUnavailableError, ResumeError) as err:
        log(ERROR, "%s", err)
        raise

    torch.set_num_threads(server_threads(config))
    random.seed(config.seed)  # Flower samples nodes with `random`
    torch.manual_seed(config.seed)  # seeds the global model's initial weights
    evaluator = CentralEvaluator(config)
    initial_arrays = ArrayRecord(evaluator.model.state_dict())

    counts = label_counts(data.train_labels, partitions, data.spec.num_classes)
    if resumed is None:
        recorder = RunRecorder(make_run_dir(config), config)
        recorder.write_partitions(counts, config.partitioner)
    else:
        recorder = RunRecorder(Path(config.resume_from), config, resumed=resumed["recorder"])
    log(INFO, "Results go to %s", recorder.run_dir)
    for pid, row in enumerate(counts):
        log(INFO, "partition %d: %d samples, label counts %s", pid, row.sum(), row.tolist())

    strategy = build_strategy(config, score_fn=evaluator.score)
    first_round = 1
    if resumed is not None:
        first_round, initial_arrays = restore(resumed, strategy)
        log(INFO, "Resuming %s at round %d from %s", recorder.run_dir, first_round,
            resumed["path"])

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        loss, accuracy = evaluator(arrays)
        if server_round == 0:
            recorder.on_initial(accuracy, loss)
        else:
            stats = getattr(strategy, "round_stats", {}).get(server_round, {})
            recorder.on_round_end(server_round, accuracy, loss, **evaluator.personal, **stats)
            if config.checkpoint_keep:
                began = time.monotonic()
                path = write_checkpoint(recorder.run_dir, server_round, checkpoint_payload(
                    config, strategy, arrays, recorder), config.checkpoint_keep)
                log(INFO, "checkpoint %s: %.2f MB in %.2f s", path,
                    path.stat().st_size / 1e6, time.monotonic() - began)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    recorder.setup_seconds = time.monotonic() - start
    log(INFO, "ServerApp set-up (config, data, partitions, evaluator, strategy): %.2f s",
        recorder.setup_seconds)
    try:
        wait_for_nodes(grid, config)
        result = strategy.start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=config.num_server_rounds,
            timeout=config.round_timeout,
            train_config=message_config(config, recorder.run_dir),
            evaluate_config=message_config(config, recorder.run_dir),
            evaluate_fn=evaluate_fn,
            first_round=first_round,
        )
    except Exception as err:
        log(ERROR, "run failed: %s", err)
        recorder.finish(status="failed", error=str(err))
        raise
    save_final_model(recorder.run_dir, result.arrays.to_torch_state_dict())
    return recorder.finish(status="completed")


def resume_point(config: RunConfig) -> dict[str, Any] | None:
    """The checkpoint ``resume-from`` names (its newest), checked against ``config``;
    None for a new run. Raises :class:`ResumeError` with the file and the reason."""
    if not config.resume_from:
        return None
    run_dir = Path(config.resume_from)
    if run_status(run_dir) == "completed":
        raise ResumeError(f"{run_dir / 'summary.json'}: the run completed; there is nothing "
                          f"to resume")
    path = latest_checkpoint(run_dir)
    payload = load_checkpoint(path, config.to_mapping())
    payload["path"] = str(path)
    return payload


def checkpoint_payload(config: RunConfig, strategy: Any, arrays: ArrayRecord,
                       recorder: RunRecorder) -> dict[str, Any]:
    """What a checkpoint holds beyond its round (see :mod:`mosaic_flwr.checkpoint`)."""
    return {"config": config.to_mapping(), "arrays": arrays.to_torch_state_dict(),
            "strategy": strategy.state_dict(), "rng": rng_states(),
            "recorder": recorder.state_dict()}


def restore(payload: dict[str, Any], strategy: Any) -> tuple[int, ArrayRecord]:
    """Put a checkpoint's strategy state and random states back; return the round to start
    at and the global model to start from."""
    strategy.load_state_dict(payload["strategy"])
    restore_rng_states(payload["rng"])
    return int(payload["round"]) + 1, ArrayRecord(payload["arrays"])
