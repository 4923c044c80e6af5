"""Reply screening: bad replies are left out, good ones averaged in partition order;
every registered strategy runs (tests/harness.py)."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from harness import TINY, run_inline
from torch import nn

from mosaic_flwr.config import RunConfig
from mosaic_flwr.aggregation import TolerantFedAvg, screen_replies, train_reply_problem
from mosaic_flwr.baselines.personalised import PersonalisedStrategy
from mosaic_flwr.data import DATASETS
from mosaic_flwr.errors import NotEnoughRepliesError
from mosaic_flwr.kd.generator import build_generator
from mosaic_flwr.mosaic.settings import MosaicSettings
from mosaic_flwr.mosaic.strategy import MosaicStrategy
from mosaic_flwr.records import CLIENT_RECORD
from mosaic_flwr.strategies import STRATEGIES, build_strategy

EXPECTED = {"w": ((2,), "float32"), "b": ((1,), "float32")}


def instruction(node_id: int) -> Message:
    return Message(RecordDict(), dst_node_id=node_id, message_type="train")


def reply(node_id, w, b=(0.0,), n=10, pid=None, metrics=None, arrays_key="arrays"):
    arrays = ArrayRecord({"w": Array(np.asarray(w, dtype=np.float32)),
                          "b": Array(np.asarray(b, dtype=np.float32))})
    content = RecordDict({arrays_key: arrays,
                          "metrics": MetricRecord(metrics or {"num-examples": n, "loss": 1.0}),
                          CLIENT_RECORD: ConfigRecord({"partition-id": node_id if pid is None else pid})})
    return Message(content, reply_to=instruction(node_id))


def error_reply(node_id):
    return Message(Error(code=0, reason="boom"), reply_to=instruction(node_id))


@pytest.fixture
def strategy(task_identity):  # pylint: disable=unused-argument
    fedavg = TolerantFedAvg(min_replies=2)
    fedavg._expected = EXPECTED  # pylint: disable=protected-access
    fedavg._num_sent = 6  # pylint: disable=protected-access
    return fedavg


def test_screening_keeps_good_replies_and_names_each_problem(task_identity):  # pylint: disable=unused-argument
    replies = [
        reply(1, [1, 1]),
        error_reply(2),
        reply(3, [np.nan, 1]),
        reply(4, [1, 1, 1]),
        reply(5, [1, 1], n=0),
        reply(6, [1, 1], metrics={"num-examples": 5, "other": 1.0}),
        reply(7, [2, 2]),
        reply(8, [2, 2], arrays_key="weights"),
    ]
    usable, rejected = screen_replies(
        replies, lambda msg: train_reply_problem(msg, EXPECTED, "arrays", "num-examples"))
    assert [m.metadata.src_node_id for m in usable] == [1, 7]
    reasons = {m.metadata.src_node_id: r for m, r in rejected}
    assert reasons[2] == "client error: boom"
    assert "NaN" in reasons[3]
    assert "float32[3], expected float32[2]" in reasons[4]
    assert "'num-examples' must be a positive number" in reasons[5]
    assert "metric names" in reasons[6]
    assert "expected one ArrayRecord 'arrays'" in reasons[8]


def test_aggregate_averages_usable_replies_weighted_by_examples(strategy):
    arrays, metrics = strategy.aggregate_train(1, [
        reply(3, [3, 3], n=30), error_reply(9), reply(1, [1, 1], n=10)])
    assert np.allclose(arrays["w"].numpy(), [2.5, 2.5])
    assert metrics["loss"] == pytest.approx(1.0)
    assert strategy.round_stats[1] == {"clients_sampled": 6, "clients_ok": 2,
                                       "clients_failed": 1, "clients_timed_out": 3}


def test_aggregation_order_does_not_depend_on_reply_order(strategy):
    replies = [reply(i, [0.1 * i, 1 / (i + 1)], n=i + 1) for i in range(6)]
    first, _ = strategy.aggregate_train(1, replies)
    second, _ = strategy.aggregate_train(1, list(reversed(replies)))
    assert np.array_equal(first["w"].numpy(), second["w"].numpy())


def test_too_few_usable_replies_stop_the_run_with_a_clear_error(strategy):
    with pytest.raises(NotEnoughRepliesError,
                       match=r"round 4: only 1 usable replies .* fewer than min-clients=2"):
        strategy.aggregate_train(4, [reply(1, [1, 1]), error_reply(2)])


def test_registry_builds_fedprox_with_the_configured_mu():
    strategy = build_strategy(RunConfig.from_mapping({"strategy": "fedprox", "proximal-mu": 0.3,
                                                      "min-clients": 4}))
    assert strategy.proximal_mu == 0.3
    assert strategy.min_replies == 4
    assert strategy.min_available_nodes == 4


def test_every_tiny_configuration_names_its_strategy():
    assert set(TINY) == set(STRATEGIES)
    assert all(overrides["strategy"] == name for name, overrides in TINY.items())


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_registered_strategy_completes_a_tiny_run_and_changes_the_model(name, tiny_run):
    run = tiny_run(name)
    rounds = sorted(run.round_stats)
    assert rounds == list(range(1, len(rounds) + 1)) and rounds
    assert all(run.round_stats[r]["clients_ok"] == run.config.num_clients for r in rounds)
    assert len(run.accuracies) == len(rounds) + 1  # round 0 (untrained) and every round
    assert run.accuracies[-1] > run.accuracies[0]
    initial = run.sent_in_round(1)[0].content["arrays"].to_torch_state_dict()
    final = run.result.arrays.to_torch_state_dict()
    assert initial.keys() == final.keys()
    assert all(not torch.equal(initial[k], final[k]) for k in final if final[k].is_floating_point())


def test_a_model_without_features_and_head_is_refused_at_construction():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # pylint: disable=arguments-differ
            return self.fc(x.flatten(1))

    with pytest.raises(TypeError, match=r"model_fn: the model Net needs a features\(x\) method.*"
                                        r"a linear classifier `head`.*an integer `feature_dim`"):
        MosaicStrategy(Net, lambda: build_generator(DATASETS["digits"], MosaicSettings().generator))


def test_a_server_step_that_diverges_is_refused_and_the_average_kept(monkeypatch, fedavg3):
    """A server step whose model holds NaN (a diverged distillation) is refused: the
    round's average becomes the global model and the round records the refusal."""
    def diverged(self, server_round, uploads, arrays):  # pylint: disable=unused-argument
        state = arrays.to_torch_state_dict()
        if server_round == 2:
            state = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                     for k, v in state.items()}
        return ArrayRecord(state), {}

    monkeypatch.setattr(PersonalisedStrategy, "server_step", diverged)
    run = run_inline(TINY["ditto"])  # Ditto's global model is FedAvg's
    assert run.round_stats[2]["server_step_refused"] == 1.0
    assert "server_step_refused" not in run.round_stats[1]
    assert run.accuracies == fedavg3.accuracies
