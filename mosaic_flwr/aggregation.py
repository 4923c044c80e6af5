"""Reply screening and averaging, shared by every strategy; FedAvg and FedProx with them.

Flower's ``FedAvg`` ends the whole ServerApp when one reply is malformed
(``InconsistentMessageReplies``). Here every strategy screens replies first: a
client that raised, timed out or sent a malformed reply is logged and left out
of that round, and the run goes on while at least ``min-clients`` replies are
usable; below that it stops with a clear error. Their common base,
:class:`TolerantAggregation`, also runs the round loop from any round (a resumed
run) and holds the state a checkpoint saves.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx, Result
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log

from .errors import NotEnoughRepliesError
from .records import CLIENT_RECORD

if TYPE_CHECKING:
    from .config import RunConfig


def reply_partition_id(msg: Message) -> int:
    """The partition a reply came from (its node id when the client did not say)."""
    record = msg.content.config_records.get(CLIENT_RECORD) if not msg.has_error() else None
    if record is not None and "partition-id" in record:
        return int(record["partition-id"])
    return int(msg.metadata.src_node_id)


def screen_replies(replies: Iterable[Message], problem: Callable[[Message], str]
                   ) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Split replies by ``problem`` (empty string: usable), then keep the common metric names."""
    usable: list[Message] = []
    rejected: list[tuple[Message, str]] = []
    for msg in replies:
        reason = problem(msg)
        if reason:
            rejected.append((msg, reason))
        else:
            usable.append(msg)
    return _same_metric_keys(usable, rejected)


def _error_problem(msg: Message) -> str:
    return f"client error: {msg.error.reason}" if msg.has_error() else ""


def evaluate_reply_problem(msg: Message, weight_key: str) -> str:
    """Why an evaluate reply is unusable ('' when usable): an error, or not exactly one
    MetricRecord with a positive ``weight_key``."""
    return _error_problem(msg) or _metrics_problem(msg, weight_key)


def train_reply_problem(msg: Message, expected: dict[str, tuple[tuple[int, ...], str]],
                        arrays_key: str, weight_key: str,
                        extra_records: frozenset[str] = frozenset()) -> str:
    """Why a training reply is unusable ('' when it is usable).

    A usable reply carries no error, exactly the ArrayRecords ``arrays_key`` and
    ``extra_records`` (their content is for the strategy to check), arrays under
    ``arrays_key`` with the expected names, shapes and dtypes and only finite
    values, and one MetricRecord with a positive ``weight_key``.
    """
    if msg.has_error():
        return _error_problem(msg)
    names = set(msg.content.array_records)
    if names != {arrays_key} | extra_records:
        if not extra_records:
            return f"expected one ArrayRecord '{arrays_key}', got {sorted(names)}"
        return f"expected ArrayRecords {sorted({arrays_key} | extra_records)}, got {sorted(names)}"
    return (arrays_problem(msg.content.array_records[arrays_key], expected)
            or _metrics_problem(msg, weight_key))


def arrays_problem(arrays: ArrayRecord, expected: dict[str, tuple[tuple[int, ...], str]]) -> str:
    """Why ``arrays`` does not match the expected names, shapes and dtypes, or is not finite."""
    if set(arrays.keys()) != set(expected):
        missing, extra = set(expected) - set(arrays.keys()), set(arrays.keys()) - set(expected)
        return f"array names differ from the global model (missing {sorted(missing)[:3]}, " \
               f"unexpected {sorted(extra)[:3]})"
    for name, array in arrays.items():
        shape, dtype = expected[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return f"array '{name}' is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
        values = array.numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"array '{name}' holds NaN or infinite values"
    return ""


def array_signature(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of an ArrayRecord, what :func:`arrays_problem` checks against."""
    return {name: (tuple(a.shape), a.dtype) for name, a in arrays.items()}


def average_arrays(records: list[ArrayRecord], weights: list[float]) -> ArrayRecord:
    """Weighted average of ArrayRecords that keeps every array's dtype.

    Flower's ``aggregate_arrayrecords`` turns integer arrays into float64
    (BatchNorm's ``num_batches_tracked``), which then no longer match the
    clients' replies; here integers are averaged, rounded and cast back.
    """
    total = float(sum(weights))
    factors = [w / total for w in weights]
    averaged = {}
    for name, first in records[0].items():
        acc = sum(f * r[name].numpy().astype(np.float64) for f, r in zip(factors, records))
        dtype = first.numpy().dtype
        if dtype.kind in "iub":
            acc = np.rint(acc)
        averaged[name] = Array(np.asarray(acc).astype(dtype))
    return ArrayRecord(averaged)


def _metrics_problem(msg: Message, weight_key: str) -> str:
    records = msg.content.metric_records
    if len(records) != 1:
        return f"expected one MetricRecord, got {len(records)}"
    metrics = next(iter(records.values()))
    weight = metrics.get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        return f"metric '{weight_key}' must be a positive number, got {weight!r}"
    return ""


def _same_metric_keys(usable: list[Message], rejected: list[tuple[Message, str]]):
    """Keep replies whose metric names match the most common set (Flower requires equal sets)."""
    if not usable:
        return usable, rejected
    def names(msg: Message) -> frozenset[str]:
        return frozenset(next(iter(msg.content.metric_records.values())).keys())
    common = Counter(names(m) for m in usable).most_common(1)[0][0]
    kept = [m for m in usable if names(m) == common]
    rejected += [(m, f"metric names {sorted(names(m))} differ from {sorted(common)}")
                 for m in usable if names(m) != common]
    return kept, rejected


def client_seconds(replies: list[Message]) -> dict[str, float]:
    """Sum and max over clients of every ``*-seconds`` metric (e.g. ``train_seconds_sum``).

    The sum is the compute the clients spent; the max bounds the round's wall time.
    """
    totals: dict[str, list[float]] = {}
    for msg in replies:
        for name, value in next(iter(msg.content.metric_records.values())).items():
            if name.endswith("-seconds") and isinstance(value, (int, float)):
                totals.setdefault(name.replace("-", "_"), []).append(float(value))
    stats = {}
    for name, values in totals.items():
        stats[f"{name}_sum"] = sum(values)
        stats[f"{name}_max"] = max(values)
    return stats


class TolerantAggregation:
    """Mixin for FedAvg-family strategies: screen replies, enforce ``min_replies``.

    Put it before the Flower strategy in the bases. ``round_stats[round]`` records
    how many clients were asked, replied usefully, failed or timed out.

    Parameters
    ----------
    min_replies : int (default: 1)
        Fewest usable training replies a round may have; with fewer, aggregation
        raises :class:`NotEnoughRepliesError` and the run stops.
    **kwargs
        Passed to the Flower strategy (``fraction_train``, ``min_train_nodes``,
        ``min_available_nodes``, ``proximal_mu`` for FedProx, ...).
    """

    arrayrecord_key: str
    weighted_by_key: str

    def __init__(self, *, min_replies: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.min_replies = min_replies
        self.round_stats: dict[int, dict[str, float]] = {}
        self._expected: dict[str, tuple[tuple[int, ...], str]] = {}
        self._num_sent = 0

    def summary(self) -> None:
        """Log the screening settings, then the wrapped strategy's summary."""
        log(INFO, "\t├──> Minimum usable replies per round: %d", self.min_replies)
        super().summary()  # type: ignore[misc]

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              first_round: int = 1) -> Result:
        """Flower's round loop (``Strategy.start``), from round ``first_round`` on.

        Flower's loop always starts at round 1; a run resumed from the checkpoint
        of round ``k`` (:mod:`mosaic_flwr.checkpoint`) starts at ``k + 1`` from that
        checkpoint's ``initial_arrays`` and the strategy state it restored, with
        no evaluation of round 0. Each round is otherwise exactly Flower's:
        configure, send and aggregate training, then client-side evaluation,
        then ``evaluate_fn(round, arrays)``.
        """
        log(INFO, "Starting %s strategy%s:", type(self).__name__,
            f" at round {first_round}" if first_round > 1 else "")
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result, arrays, began = Result(), initial_arrays, time.time()
        result.arrays = arrays
        if evaluate_fn is not None and first_round == 1:
            metrics = evaluate_fn(0, arrays)
            if metrics is not None:
                result.evaluate_metrics_serverapp[0] = metrics
        for current in range(first_round, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", current, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(current, arrays, train_config, grid),
                timeout=timeout)
            new_arrays, train_metrics = self.aggregate_train(current, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
                result.train_metrics_clientapp[current] = train_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(current, arrays, evaluate_config, grid),
                timeout=timeout)
            evaluate_metrics = self.aggregate_evaluate(current, replies)
            if evaluate_metrics is not None:
                log(INFO, "\t└──> Aggregated MetricRecord: %s", evaluate_metrics)
                result.evaluate_metrics_clientapp[current] = evaluate_metrics
            if evaluate_fn is not None:
                metrics = evaluate_fn(current, arrays)
                if metrics is not None:
                    result.evaluate_metrics_serverapp[current] = metrics
        log(INFO, "Strategy execution finished in %.2fs", time.time() - began)
        return result

    def state_dict(self) -> dict[str, Any]:
        """Every piece of server state a later round reads, for a checkpoint
        (:mod:`mosaic_flwr.checkpoint`); a method that keeps more extends it."""
        return {"round_stats": self.round_stats}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what :meth:`state_dict` returned."""
        self.round_stats = state["round_stats"]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Remember what a valid reply must look like, then configure as usual."""
        self._expected = array_signature(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._num_sent = len(messages)
        return messages

    def reply_problem(self, server_round: int, msg: Message) -> str:  # pylint: disable=unused-argument
        """Why a training reply is unusable ('' when usable); strategies expecting more extend it."""
        return train_reply_problem(msg, self._expected, self.arrayrecord_key, self.weighted_by_key)

    def screen_train(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The usable replies, ordered by partition id; logs and counts the others.

        Raises :class:`NotEnoughRepliesError` when fewer than ``min_replies`` are usable.
        """
        replies = list(replies)
        usable, rejected = screen_replies(replies, lambda msg: self.reply_problem(server_round, msg))
        self._log_rejections(server_round, rejected)
        timed_out = max(0, self._num_sent - len(replies))
        if timed_out:
            log(WARNING, "round %d: %d of %d clients sent no reply before the round timeout",
                server_round, timed_out, self._num_sent)
        self.round_stats[server_round] = {
            "clients_sampled": self._num_sent, "clients_ok": len(usable),
            "clients_failed": len(rejected), "clients_timed_out": timed_out}
        if len(usable) < self.min_replies:
            reasons = Counter(reason for _, reason in rejected).most_common(1)
            common = (f"; most common problem ({reasons[0][1]} replies): {reasons[0][0]}"
                      if reasons else "")
            raise NotEnoughRepliesError(
                f"round {server_round}: only {len(usable)} usable replies from "
                f"{self._num_sent} sampled clients, fewer than min-clients={self.min_replies} "
                f"(min_replies in Python) ({len(rejected)} failed or malformed, {timed_out} "
                f"timed out){common}; stopping the run")
        usable.sort(key=reply_partition_id)
        self.round_stats[server_round].update(client_seconds(usable))
        return usable

    def average(self, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """Sample-weighted average of the replies' models and of their metrics."""
        arrays = average_arrays([m.content.array_records[self.arrayrecord_key] for m in replies],
                                self.reply_weights(replies))
        return arrays, self.average_metrics(replies)

    def reply_weights(self, replies: list[Message]) -> list[float]:
        """Each reply's aggregation weight (its ``weighted_by_key`` metric, e.g. num-examples)."""
        return [float(next(iter(m.content.metric_records.values()))[self.weighted_by_key])
                for m in replies]

    def average_metrics(self, replies: list[Message]) -> MetricRecord | None:
        """The replies' training metrics, averaged by the strategy's metric aggregation."""
        records = [RecordDict({"metrics": next(iter(m.content.metric_records.values()))})
                   for m in replies]
        return self.train_metrics_aggr_fn(records, self.weighted_by_key)  # type: ignore[attr-defined]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the usable replies, in partition-id order (reproducible sums)."""
        return self.average(self.screen_train(server_round, replies))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Aggregate client-side evaluation metrics from the usable replies only.

        The aggregate joins ``round_stats`` (e.g. ``local_accuracy``), so it lands
        in the round's line of ``metrics.jsonl``.
        """
        usable, rejected = screen_replies(
            replies, lambda msg: evaluate_reply_problem(msg, self.weighted_by_key))
        self._log_rejections(server_round, rejected)
        usable.sort(key=reply_partition_id)
        metrics = super().aggregate_evaluate(server_round, usable)  # type: ignore[misc]
        if metrics is not None:
            self.round_stats.setdefault(server_round, {}).update(
                {name.replace("-", "_"): value for name, value in metrics.items()})
        return metrics

    @staticmethod
    def _log_rejections(server_round: int, rejected: list[tuple[Message, str]]) -> None:
        for msg, reason in rejected:
            log(WARNING, "round %d: leaving out the reply of node %d: %s",
                server_round, msg.metadata.src_node_id, reason)


class TolerantFedAvg(TolerantAggregation, FedAvg):
    """Flower's FedAvg with reply screening and a minimum of usable replies."""

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: Any = None,  # pylint: disable=unused-argument
                    **kwargs) -> "TolerantFedAvg":
        """The strategy for a run config (``kwargs``: sampling options)."""
        return cls(**kwargs)


class TolerantFedProx(TolerantAggregation, FedProx):
    """Flower's FedProx (clients add mu/2 * ||w - w_global||^2) with reply screening."""

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: Any = None,  # pylint: disable=unused-argument
                    **kwargs) -> "TolerantFedProx":
        """The strategy for a run config: ``proximal-mu`` and the sampling options."""
        return cls(proximal_mu=config.proximal_mu, **kwargs)
