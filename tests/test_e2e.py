"""End to end through the real `flwr run` simulation runtime on a private SuperLink.

Each test asserts the run's final status as the SuperLink reports it
(`finished:completed` / `finished:failed`), not the exit code of `flwr run`,
which is 0 even when the ServerApp raised.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mosaic_flwr.simulation import FLOWER_ENV, LocalSuperLink, free_port, simulate

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent

FAULTY_CLIENT = '''
"""A ClientApp that misbehaves on purpose: partition 0 raises, 1 sends NaN weights,
2 sends no metrics, 3 answers too late in round 2."""
import time

import numpy as np
from flwr.app import Array
from flwr.clientapp import ClientApp

from mosaic_flwr.client import handle_train

app = ClientApp()


@app.train()
def train(msg, context):
    pid = int(context.node_config["partition-id"])
    if pid == 0:
        raise RuntimeError("injected failure")
    if pid == 3 and int(msg.content["config"]["server-round"]) == 2:
        time.sleep(40)
    reply = handle_train(msg, context)
    if pid == 1:
        arrays = reply.content["arrays"]
        name = next(iter(arrays.keys()))
        arrays[name] = Array(np.full(arrays[name].shape, np.nan, dtype=np.float32))
    if pid == 2:
        del reply.content["metrics"]
    return reply
'''


@pytest.fixture(scope="module")
def superlink():
    with LocalSuperLink() as link:
        yield link


@pytest.fixture(scope="module")
def faulty_app(tmp_path_factory) -> Path:
    """This app with its ClientApp replaced by one that misbehaves."""
    app = tmp_path_factory.mktemp("faulty_app")
    shutil.copytree(ROOT / "server_app", app / "server_app")
    shutil.copytree(ROOT / "configs", app / "configs")
    (app / "faulty_client.py").write_text(FAULTY_CLIENT)
    pyproject = (ROOT / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        pyproject.replace('clientapp = "client_app.app:app"', 'clientapp = "faulty_client:app"'))
    return app


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_simulation_completes_and_repeats_exactly(superlink, tmp_path):
    overrides = {"num-server-rounds": 3, "partitioner": "dirichlet", "dirichlet-alpha": 0.5,
                 "seed": 1, "fraction-evaluate": 1.0}
    first = simulate(overrides, superlink=superlink, output_dir=tmp_path)
    assert first.completed, first.log[-3000:]
    summary = first.summary
    assert summary["status"] == "completed" and summary["num_clients"] == 10
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in summary["rounds"])
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.2
    partitions = json.loads((first.run_dir / "partitions.json").read_text())
    assert sum(c["num_examples"] for c in partitions["clients"]) == 1438
    lines = metrics_lines(first.run_dir)
    assert [m["clients_ok"] for m in lines] == [10, 10, 10]
    # Client-side evaluation: every client scores the global model on its own data.
    assert all(0.0 <= m["local_accuracy"] <= 1.0 and m["local_loss"] > 0 for m in lines)
    assert (first.run_dir / "accuracy.png").exists() and (first.run_dir / "flwr.log").exists()

    second = simulate(overrides, superlink=superlink, output_dir=tmp_path)
    assert second.completed
    assert second.run_dir != first.run_dir
    assert [r["accuracy"] for r in second.summary["rounds"]] == \
        [r["accuracy"] for r in summary["rounds"]]


def test_preset_strategy_and_wandb_come_from_the_run_config(superlink, tmp_path):
    """The preset's values apply, explicit --run-config values beat them, wandb logs offline."""
    outcome = simulate({"preset": "digits-dirichlet", "strategy": "fedprox",
                        "num-server-rounds": 2, "local-epochs": 1, "wandb": True,
                        "wandb-mode": "offline"}, superlink=superlink, output_dir=tmp_path)
    assert outcome.completed, outcome.log[-3000:]
    summary = outcome.summary
    assert (summary["strategy"], summary["partitioner"], summary["dirichlet_alpha"]) == \
        ("fedprox", "dirichlet", 0.1)
    assert len(summary["rounds"]) == 2  # explicit value, not the preset's 20
    assert summary["config"]["local-epochs"] == 1
    assert "Proximal mu: 0.01" in outcome.log  # Flower's FedProx summary line
    assert len(list((outcome.run_dir / "wandb").glob("offline-run-*/*.wandb"))) == 1


@pytest.mark.parametrize("overrides,line", [
    ({"dirichlet-alpha": -1.0}, "invalid run config: dirichlet-alpha=-1.0: must be > 0"),
    ({"strategy": "fedsgd"}, "invalid run config: strategy='fedsgd': must be one of dense, "
                             "fedavg, fedcog, feddf, fedftg, fedgen, fedprox, fedrolex, "
                             "heterofl, mosaic"),
    ({"num-clients": 5000, "min-clients": 1},
     "invalid run config: num-clients=5000: must be <= the 1438 training samples of digits"),
])
def test_invalid_config_fails_the_run_before_any_training(superlink, tmp_path, overrides, line):
    outcome = simulate(overrides, superlink=superlink, output_dir=tmp_path, validate=False,
                       num_supernodes=2)
    assert outcome.status == "finished:failed"
    error_lines = [l for l in outcome.log.splitlines() if "ERROR" in l]
    assert error_lines[0].rstrip().endswith(line)  # our line comes first, before any traceback
    assert "[ROUND 1" not in outcome.log
    assert not (outcome.run_dir / "metrics.jsonl").exists()


def test_failing_malformed_and_late_clients_are_left_out(superlink, tmp_path, faulty_app):
    # Round 1 includes the start of the Ray actors, so the timeout leaves room for it.
    outcome = simulate({"num-server-rounds": 2, "round-timeout": 25.0}, superlink=superlink,
                       app_dir=faulty_app, output_dir=tmp_path)
    assert outcome.completed, outcome.log[-3000:]
    first, second = metrics_lines(outcome.run_dir)
    assert (first["clients_ok"], first["clients_failed"], first["clients_timed_out"]) == (7, 3, 0)
    assert (second["clients_ok"], second["clients_failed"], second["clients_timed_out"]) == (6, 3, 1)
    assert "client error" in outcome.log and "NaN" in outcome.log
    assert outcome.summary["final_accuracy"] > 0.3


def test_too_few_good_clients_stop_the_run_clearly_and_keep_the_results(superlink, tmp_path,
                                                                        faulty_app):
    outcome = simulate({"num-server-rounds": 2, "min-clients": 8}, superlink=superlink,
                       app_dir=faulty_app, output_dir=tmp_path)
    assert outcome.status == "finished:failed"
    assert "fewer than min-clients=8" in outcome.log
    summary = outcome.summary
    assert summary["status"] == "failed" and "min-clients=8" in summary["error"]


#: A short, cheap Mosaic schedule: warm-up round 1, distillation in round 2, fine-tuning round 3.
SHORT_MOSAIC = {"strategy": "mosaic", "partitioner": "dirichlet", "dirichlet-alpha": 0.1,
                "num-server-rounds": 3, "local-epochs": 1, "mosaic-warmup-rounds": 1,
                "mosaic-generator-steps": 20, "mosaic-meta-epochs": 10, "mosaic-distill-steps": 20}


def test_mosaic_runs_its_whole_schedule_under_flwr_run(superlink, tmp_path):
    outcome = simulate(SHORT_MOSAIC, superlink=superlink, output_dir=tmp_path)
    assert outcome.completed, outcome.log[-3000:]
    lines = metrics_lines(outcome.run_dir)
    assert [m["phase"] for m in lines] == ["warmup", "distill", "finetune"]
    distill = lines[1]
    assert distill["clients_ok"] == 10 and distill["num_prototypes"] > 0
    for key in ("teacher_accuracy", "ensemble_accuracy", "meta_prototype_accuracy",
                "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= distill[key] <= 1.0, key
    assert distill["accuracy"] == distill["student_accuracy_after"]
    assert distill["generator_seconds_sum"] > 0 and distill["distill_seconds"] > 0
    assert "[mosaic] distillation step 20/20" in outcome.log
    assert "[mosaic] meta model epoch 10/10" in outcome.log


def test_compare_writes_one_table_over_methods_and_seeds(tmp_path):
    from mosaic_flwr.cli import main  # pylint: disable=import-outside-toplevel

    out = tmp_path / "cmp"
    code = main(["compare", "--methods", "fedavg", "mosaic-no-meta", "--seeds", "0", "1",
                 "--output-dir", str(out), "-c",
                 " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}".replace('"', "'")
                          for k, v in SHORT_MOSAIC.items() if k != "strategy")])
    assert code == 0
    rows = (out / "comparison.csv").read_text().splitlines()
    assert len(rows) == 1 + 4
    report = (out / "comparison.md").read_text()
    assert "partitions identical across methods for each seed: yes" in report
    assert "| fedavg | 0.1 |" in report and "| mosaic-no-meta | 0.1 |" in report
    assert (out / "comparison.png").stat().st_size > 0
    assert len(list((out / "runs").iterdir())) == 4


def test_plain_flwr_run_after_the_readme_setup_uses_ten_clients(tmp_path):
    """README: set the local federation to 10 SuperNodes once, then plain `flwr run .`."""
    port, control = free_port(), free_port()
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(tmp_path / "flwr-home"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control)}

    def flwr(*args):
        return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True,
                              timeout=300, check=False)
    try:
        setup = flwr("federation", "simulation-config", "--num-supernodes", "10",
                     "--client-resources-num-cpus", "1")
        assert "Updated simulation configuration" in setup.stdout, setup.stdout + setup.stderr
        run = flwr("run", str(ROOT), "--stream", "--run-config",
                   f"output-dir='{tmp_path}' run-name='plain' num-server-rounds=2")
        run_id = next(line.rsplit(" ", 1)[-1] for line in run.stdout.splitlines()
                      if "Successfully started run" in line)
        status = json.loads(flwr("ls", "--run-id", run_id, "--format", "json").stdout)
        assert status["runs"][0]["status"] == "finished:completed", run.stdout[-3000:]
        summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
        assert summary["num_clients"] == 10 and len(summary["rounds"]) == 2
        assert [m["clients_ok"] for m in metrics_lines(tmp_path / "plain")] == [10, 10]
    finally:
        # `flwr` detached the local SuperLink into its own session: stop it by PID.
        found = subprocess.run(["pgrep", "-f", f"flower-superlink.*--port {port}"],
                               capture_output=True, text=True, check=False)
        for pid in map(int, found.stdout.split()):
            os.killpg(pid, signal.SIGTERM)
            for _ in range(50):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.2)
            else:
                os.killpg(pid, signal.SIGKILL)


#: Every baseline on a short schedule with small server budgets (same for all runs).
SHORT_BASELINES = {"partitioner": "dirichlet", "dirichlet-alpha": 0.1, "num-clients": 4,
                   "num-server-rounds": 2,
                   "local-epochs": 1, "fedgen-generator-steps": 10, "fedftg-iterations": 2,
                   "dense-epochs": 2, "dense-generator-steps": 5,
                   "dense-synthesis-batch-size": 32, "feddf-steps": 10,
                   "mosaic-generator-steps": 10, "fedcog-start-round": 2,
                   "fedcog-generation-steps": 10, "fedcog-num-samples": 32}


def test_every_baseline_completes_under_flwr_run(tmp_path):
    from mosaic_flwr.cli import main  # pylint: disable=import-outside-toplevel

    methods = ["fedgen", "fedftg", "dense", "feddf", "fedcog"]
    out = tmp_path / "baselines"
    code = main(["compare", "--methods", *methods, "--seeds", "0", "--output-dir", str(out), "-c",
                 " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}"
                          for k, v in SHORT_BASELINES.items())])
    assert code == 0
    for method in methods:
        run_dir = out / "runs" / f"{method}-seed0"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed", (method, summary)
        assert summary["strategy"] == method
        assert 0.0 < summary["final_accuracy"] <= 1.0
        lines = metrics_lines(run_dir)
        assert len(lines) == (1 if method == "dense" else 2)  # DENSE is one-shot
        assert all(line["clients_ok"] == 4 for line in lines)
    report = (out / "comparison.md").read_text()
    assert "partitions identical across methods for each seed: yes" in report


WIDTH_GROUPS = "cnn@1,cnn@0.5,cnn@0.25"
ARCHITECTURES = "cnn,resnet8@0.5,resnet18@0.25"


@pytest.mark.parametrize("overrides", [
    {"strategy": "heterofl", "num-server-rounds": 2, "local-epochs": 1},
    {"strategy": "fedrolex", "num-server-rounds": 2, "local-epochs": 1},
    SHORT_MOSAIC,
], ids=["heterofl", "fedrolex", "mosaic"])
def test_three_width_groups_complete_under_flwr_run(superlink, tmp_path, overrides):
    outcome = simulate({**overrides, "client-models": WIDTH_GROUPS}, superlink=superlink,
                       output_dir=tmp_path)
    assert outcome.completed, outcome.log[-3000:]
    lines = metrics_lines(outcome.run_dir)
    assert len(lines) == overrides["num-server-rounds"]
    assert all(line["clients_ok"] == 10 and line["clients_failed"] == 0 for line in lines)
    assert outcome.summary["final_accuracy"] > 0.1


def test_mosaic_with_three_architectures_completes_under_flwr_run(superlink, tmp_path):
    outcome = simulate({**SHORT_MOSAIC, "global-model": "cnn", "client-models": ARCHITECTURES},
                       superlink=superlink, output_dir=tmp_path)
    assert outcome.completed, outcome.log[-3000:]
    distill = metrics_lines(outcome.run_dir)[1]
    assert distill["phase"] == "distill" and distill["clients_ok"] == 10
    for key in ("teacher_accuracy", "ensemble_accuracy", "student_accuracy_after"):
        assert 0.0 <= distill[key] <= 1.0, key
