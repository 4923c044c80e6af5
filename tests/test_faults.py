"""Fault injection (fault-rate): seeded client failures the server must tolerate."""

import pytest
from harness import run_inline

from mosaic_flwr.client import handle_train
from mosaic_flwr.config import ConfigError, RunConfig
from mosaic_flwr.faults import FAULT_KINDS, InjectedFault, injected_fault

#: 10 clients, 10 rounds of one local epoch on IID digits.
TEN = {"num-clients": 10, "num-server-rounds": 10, "local-epochs": 1, "min-clients": 2}


def test_the_draw_is_seeded_and_close_to_the_rate():
    draws = [injected_fault(0, p, r, 0.3, FAULT_KINDS) for p in range(10) for r in range(1, 101)]
    assert draws == [injected_fault(0, p, r, 0.3, FAULT_KINDS)
                     for p in range(10) for r in range(1, 101)]
    assert draws != [injected_fault(1, p, r, 0.3, FAULT_KINDS)
                     for p in range(10) for r in range(1, 101)]
    failed = [d for d in draws if d]
    assert 0.25 < len(failed) / len(draws) < 0.35
    assert set(failed) == set(FAULT_KINDS)
    assert not any(injected_fault(0, p, 1, 0.0, FAULT_KINDS) for p in range(100))


def test_bad_fault_settings_are_config_errors():
    with pytest.raises(ConfigError, match="fault-rate=1.0: must be in"):
        RunConfig.from_mapping({"fault-rate": 1.0})
    with pytest.raises(ConfigError, match="fault-kinds='raise,crash': must be a comma-separated"):
        RunConfig.from_mapping({"fault-kinds": "raise,crash"})


def test_thirty_percent_faults_are_counted_and_cost_little_accuracy():
    clean = run_inline(TEN)
    faulty = run_inline({**TEN, "fault-rate": 0.3, "fault-kinds": "raise,nan"})
    expected = {r: sum(bool(injected_fault(0, p, r, 0.3, ("raise", "nan"))) for p in range(10))
                for r in range(1, 11)}
    assert sum(expected.values()) > 15
    for server_round, failed in expected.items():
        stats = faulty.round_stats[server_round]
        assert stats["clients_failed"] == failed
        assert stats["clients_ok"] == 10 - failed
    assert abs(faulty.accuracies[-1] - clean.accuracies[-1]) <= 0.02


def test_a_timeout_fault_sleeps_past_the_round_timeout_then_fails(monkeypatch, tiny_run):
    run = tiny_run("fedavg")  # a real instruction to replay, before the patches
    slept = []
    monkeypatch.setattr("mosaic_flwr.client.injected_fault", lambda *args: "timeout")
    monkeypatch.setattr("mosaic_flwr.client.time.sleep", slept.append)
    msg = run.grid.sent[0]
    with pytest.raises(InjectedFault, match="fails round 1 on purpose"):
        handle_train(msg, run.grid.contexts[msg.metadata.dst_node_id])
    assert slept == [run.config.round_timeout + 1]
