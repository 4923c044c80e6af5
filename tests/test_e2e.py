"""End to end through the real `flwr run` simulation runtime.

Each runtime feature runs once here; what a strategy does with its replies is
tested in-process (tests/harness.py). Every test asserts a run's final status
as the SuperLink reports it (`finished:completed` / `finished:failed`), not the
exit code of `flwr run`, which is 0 even when the ServerApp raised.

The runs: one seeded Spectral Co-Distillation run on a preset through
`mosaic-flwr simulate`'s launcher (personalised models kept in node state across
rounds and scored on each client's own split) and the same run config through
the README's plain `flwr run` setup (they must agree with each other and with the
in-process run); one run with misbehaving clients; Mosaic with three
architectures, killed (kill -9, every process) in its distillation round and
resumed; and the `compare` command (the Spectral run kept from the seeded run, a
FedLGD run: a server step, records sent with every instruction, client state kept
across rounds). The run with misbehaving clients (FedAvg) reads a user's own data: a generated 5-class imagefolder of 24x24
RGB images (`dataset='folder'`), decoded once into the data cache and mapped by the
Ray actors (Mosaic on such a folder under `flwr run`: tests/test_ray_cluster.py).
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deploy_harness import terminate
from harness import run_inline, write_imagefolder

from mosaic_flwr.cli import main as cli_main
from mosaic_flwr.config import load_preset
from mosaic_flwr.node_state import saved_rounds
from mosaic_flwr.simulation import FLOWER_ENV, LocalSuperLink, free_port, simulate, toml_value

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent

#: Spectral Co-Distillation (not the default strategy; clients keep state between
#: rounds) on the digits-dirichlet preset (Dirichlet 0.1, 10 clients, 20 rounds x 5
#: epochs), cut to 2 rounds x 1 epoch by explicit values; every client also scores the
#: global model on its data; wandb logs offline.
SEEDED = {"preset": "digits-dirichlet", "strategy": "spectral-codistillation",
          "num-server-rounds": 2, "local-epochs": 1, "seed": 1, "fraction-evaluate": 1.0,
          "wandb": True, "wandb-mode": "offline"}

FAULTY_CLIENT = '''
"""A ClientApp that misbehaves on purpose: partition 0 raises, 1 sends NaN weights,
2 sends no metrics, 3 answers too late in round 2, 4 and 5 raise in round 3."""
import time

import numpy as np
from flwr.app import Array
from flwr.clientapp import ClientApp

from mosaic_flwr.client import handle_train

app = ClientApp()


@app.train()
def train(msg, context):
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    if pid == 0 or (pid in (4, 5) and server_round == 3):
        raise RuntimeError("injected failure")
    if pid == 3 and server_round == 2:
        time.sleep(23)
    reply = handle_train(msg, context)
    if pid == 1:
        arrays = reply.content["arrays"]
        name = next(iter(arrays.keys()))
        arrays[name] = Array(np.full(arrays[name].shape, np.nan, dtype=np.float32))
    if pid == 2:
        del reply.content["metrics"]
    return reply
'''

#: Mosaic's whole schedule (warm-up round 1, distillation in round 2, fine-tuning round 3)
#: with clients of three architectures: CNNs (the global model), ResNet-8s and ResNet-18s;
#: the trust checks (on by default) ask the clients to score each change.
MOSAIC = {"strategy": "mosaic", "partitioner": "dirichlet", "dirichlet-alpha": 0.1,
          "num-server-rounds": 3, "local-epochs": 1, "mosaic-warmup-rounds": 1,
          "mosaic-generator-steps": 10, "mosaic-meta-epochs": 5, "mosaic-distill-steps": 10,
          "global-model": "cnn", "client-models": "cnn,resnet8@0.5,resnet18@0.25"}


def metrics_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def round_accuracies(summary: dict) -> list[float]:
    """Test accuracy of the untrained model, then after every round."""
    return [summary["initial_accuracy"], *(r["accuracy"] for r in summary["rounds"])]


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> dict:
    """A user's own data: an imagefolder of 5 classes of 24x24 RGB images (100 train and
    20 test per class); returns the run-config keys that select it."""
    root = write_imagefolder(tmp_path_factory.mktemp("own"), per_class=(100, 20))
    return {"dataset": "folder", "data-path": str(root)}


@pytest.fixture(scope="module")
def superlink():
    with LocalSuperLink() as link:
        yield link


@pytest.fixture(scope="module")
def seeded_run(superlink, tmp_path_factory):
    """SEEDED through `mosaic-flwr simulate`'s launcher."""
    outcome = simulate(SEEDED, superlink=superlink, output_dir=tmp_path_factory.mktemp("seeded"))
    assert outcome.completed, outcome.log[-3000:]
    return outcome


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """README: set the local federation to 10 SuperNodes once, then plain `flwr run .`
    (with SEEDED as its run config); returns the run's folder."""
    base = tmp_path_factory.mktemp("plain")
    port, control = free_port(), free_port()
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(base / "flwr-home"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control)}

    def flwr(*args):
        return subprocess.run(["flwr", *args], env=env, capture_output=True, text=True,
                              timeout=300, check=False)
    run_config = " ".join(f"{key}={json.dumps(value)}" for key, value in
                          {**SEEDED, "output-dir": str(base), "run-name": "plain"}.items())
    try:
        setup = flwr("federation", "simulation-config", "--num-supernodes", "10",
                     "--client-resources-num-cpus", "1")
        assert "Updated simulation configuration" in setup.stdout, setup.stdout + setup.stderr
        run = flwr("run", str(ROOT), "--stream", "--run-config", run_config)
        run_id = next(line.rsplit(" ", 1)[-1] for line in run.stdout.splitlines()
                      if "Successfully started run" in line)
        status = json.loads(flwr("ls", "--run-id", run_id, "--format", "json").stdout)
        assert status["runs"][0]["status"] == "finished:completed", run.stdout[-3000:]
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
    return base / "plain"


# ---------------------------------------------------------------- a seeded run, twice
def test_simulation_completes_and_writes_its_results(seeded_run):
    summary = seeded_run.summary
    assert summary["status"] == "completed" and summary["num_clients"] == 10
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["final_accuracy"] == summary["rounds"][-1]["accuracy"]
    assert summary["final_accuracy"] > summary["initial_accuracy"] + 0.05
    partitions = json.loads((seeded_run.run_dir / "partitions.json").read_text())
    assert sum(c["num_examples"] for c in partitions["clients"]) == 1438
    lines = metrics_lines(seeded_run.run_dir)
    assert [(m["round"], m["clients_ok"]) for m in lines] == [(1, 10), (2, 10)]
    assert [m["accuracy"] for m in lines] == [r["accuracy"] for r in summary["rounds"]]
    assert all("local_accuracy" in m for m in lines)  # every client scored the global model
    # Every client's personalised model (kept in its node state: the compare test below
    # reads what the nodes saved) is scored on the client's own split, every round.
    assert all(0 < m["personalised_accuracy_worst10"] <= m["personalised_accuracy_mean"]
               for m in lines)
    assert (seeded_run.run_dir / "accuracy.png").exists()
    assert (seeded_run.run_dir / "flwr.log").exists()


def test_preset_strategy_and_wandb_come_from_the_run_config(seeded_run):
    """The preset's values apply, explicit --run-config values beat them, wandb logs offline."""
    summary = seeded_run.summary
    assert (summary["strategy"], summary["partitioner"], summary["dirichlet_alpha"]) == \
        ("spectral-codistillation", "dirichlet", 0.1)
    assert len(summary["rounds"]) == 2  # explicit value, not the preset's 20
    assert summary["config"]["local-epochs"] == 1
    assert len(list((seeded_run.run_dir / "wandb").glob("offline-run-*/*.wandb"))) == 1


def test_plain_flwr_run_after_the_readme_setup_uses_ten_clients(plain_run):
    summary = json.loads((plain_run / "summary.json").read_text())
    assert summary["num_clients"] == 10 and len(summary["rounds"]) == 2
    assert [m["clients_ok"] for m in metrics_lines(plain_run)] == [10, 10]


def test_a_seeded_run_repeats_exactly(seeded_run, plain_run):
    again = json.loads((plain_run / "summary.json").read_text())
    assert plain_run != seeded_run.run_dir
    assert round_accuracies(again) == round_accuracies(seeded_run.summary)
    assert [r["loss"] for r in again["rounds"]] == [r["loss"] for r in seeded_run.summary["rounds"]]
    assert [m["local_accuracy"] for m in metrics_lines(plain_run)] == \
        [m["local_accuracy"] for m in metrics_lines(seeded_run.run_dir)]


def test_flwr_run_gives_the_accuracies_of_the_same_config_run_in_process(seeded_run):
    """Ray, the SuperLink and message serialisation change nothing a client or the server computes."""
    keys = {k: v for k, v in SEEDED.items() if k not in ("preset", "wandb", "wandb-mode")}
    inline = run_inline({**load_preset(SEEDED["preset"]), **keys})
    assert inline.accuracies == round_accuracies(seeded_run.summary)
    assert [inline.round_stats[r]["local_accuracy"] for r in (1, 2)] == \
        [m["local_accuracy"] for m in metrics_lines(seeded_run.run_dir)]


# ---------------------------------------------------------------- runs that go wrong
@pytest.fixture(scope="module")
def faulty_run(superlink, own_data, tmp_path_factory):
    """This app with its ClientApp replaced by FAULTY_CLIENT, 3 rounds, min-clients 6, on
    the user's own folder."""
    app = tmp_path_factory.mktemp("faulty_app")
    shutil.copytree(ROOT / "server_app", app / "server_app")
    shutil.copytree(ROOT / "configs", app / "configs")
    (app / "faulty_client.py").write_text(FAULTY_CLIENT)
    pyproject = (ROOT / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        pyproject.replace('clientapp = "client_app.app:app"', 'clientapp = "faulty_client:app"'))
    # Round 1 includes the start of the Ray actors (about 10 s on 2 cores): the timeout
    # leaves room for it.
    return simulate({**own_data, "num-server-rounds": 3, "local-epochs": 1,
                     "round-timeout": 20.0, "min-clients": 6}, superlink=superlink, app_dir=app,
                    output_dir=tmp_path_factory.mktemp("faulty"))


def test_failing_malformed_and_late_clients_are_left_out(faulty_run):
    first, second = metrics_lines(faulty_run.run_dir)
    assert (first["clients_ok"], first["clients_failed"], first["clients_timed_out"]) == (7, 3, 0)
    assert (second["clients_ok"], second["clients_failed"], second["clients_timed_out"]) == (6, 3, 1)
    assert "client error" in faulty_run.log and "NaN" in faulty_run.log
    data = faulty_run.summary["data"]  # read from the folder: nothing was registered
    assert (data["num_classes"], data["image_size"], data["channels"]) == (5, 24, 3)
    assert data["class_names"] == ["cat", "dog", "fox", "owl", "yak"]
    assert second["accuracy"] > faulty_run.summary["initial_accuracy"] + 0.2


def test_too_few_good_clients_stop_the_run_clearly_and_keep_the_results(faulty_run):
    assert faulty_run.status == "finished:failed"
    assert "fewer than min-clients=6" in faulty_run.log
    summary = faulty_run.summary
    assert summary["status"] == "failed"
    # Round 3: partitions 0-2, 4 and 5 fail (partition 3 may still be asleep from round 2).
    assert summary["error"].startswith("round 3: only ") and "min-clients=6" in summary["error"]
    # The two rounds before are kept, in the summary and in metrics.jsonl.
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert [m["accuracy"] for m in metrics_lines(faulty_run.run_dir)] == \
        [r["accuracy"] for r in summary["rounds"]]


# ---------------------------------------------------------------- Mosaic, compare
@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> Path:
    """MOSAIC through `mosaic-flwr simulate`, killed with everything it started (kill -9)
    in its distillation round, then continued with `mosaic-flwr simulate --resume`."""
    out = tmp_path_factory.mktemp("killed")
    run_dir = out / "mosaic"
    overrides = {**MOSAIC, "run-name": "mosaic", "server-threads": 1}
    command = [sys.executable, "-m", "mosaic_flwr.cli", "simulate", "--output-dir", str(out),
               "-c", " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())]
    log = out / "killed.log"
    with log.open("wb") as stream:
        proc = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "round-00001.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1)  # round 2 is under way: the clients train their generators
    finally:  # SIGKILL to it and every process below it, as a crash of the machine would
        terminate(proc, signal.SIGKILL, wait=30)
    assert not (run_dir / "summary.json").exists(), log.read_text()[-3000:]
    assert [m["round"] for m in metrics_lines(run_dir)] == [1]
    assert cli_main(["simulate", "--resume", str(run_dir)]) == 0
    return run_dir


def test_mosaic_runs_its_whole_schedule_with_three_architectures_under_flwr_run(
        killed_and_resumed):
    run_dir = killed_and_resumed
    log = (run_dir / "flwr.log").read_text()
    lines = metrics_lines(run_dir)
    kept = lines[1]["distilled"] == 1.0  # else round 3 trains as a FedAvg round
    assert [m["phase"] for m in lines] == ["warmup", "distill", "finetune" if kept else "train"]
    assert all(m["clients_ok"] == 10 and m["clients_failed"] == 0 for m in lines)
    distill = lines[1]  # every client, of every architecture, sent prototypes and a probe head
    assert distill["num_prototypes"] > 0 and distill["generator_seconds_sum"] > 0
    # The distilled student is the round's global model, and distillation trained it
    # (after one short warm-up round its test accuracy may still sit at chance).
    assert distill["accuracy"] == distill["student_accuracy_after"]
    assert distill["distill_loss_last"] < 0.9 * distill["distill_loss_first"]
    # The trust checks asked all ten clients, in the distillation round and, after the
    # resume (new node ids), in a fine-tuning round: found again by partition (also
    # tests/test_resume.py's mosaic-trust case, where the distillation is always kept).
    assert distill["federated_check_clients"] == 10
    assert lines[2]["federated_check_clients"] == 10
    assert "[mosaic] distillation step 10/10" in log
    assert "[mosaic] meta model epoch 5/5" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["client-models"] == MOSAIC["client-models"]
    assert summary["final_accuracy"] > summary["initial_accuracy"]


def test_a_killed_simulation_resumes_to_the_result_of_one_never_stopped(killed_and_resumed):
    """kill -9 in the distillation round, then --resume: round 2 runs again (only it), and
    every round's accuracy is the uninterrupted run's (the same config in process)."""
    summary = json.loads((killed_and_resumed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_rounds"] == [1]
    assert [m["round"] for m in metrics_lines(killed_and_resumed)] == [1, 2, 3]
    uninterrupted = run_inline(MOSAIC)
    assert round_accuracies(summary) == uninterrupted.accuracies
    assert [r["loss"] for r in summary["rounds"]] == [  # finer than accuracy near chance
        uninterrupted.result.evaluate_metrics_serverapp[r]["loss"] for r in (1, 2, 3)]
    assert (killed_and_resumed / "final_model.pt").is_file()


def test_compare_keeps_a_finished_run_and_writes_one_table_over_methods(seeded_run, tmp_path):
    """compare into a folder that already holds the Spectral run (the seeded run, copied in
    as an earlier sitting would have left it): that run is kept, not repeated; only
    FedLGD runs; the report covers both, on identical partitions."""
    out = tmp_path / "cmp"
    shutil.copytree(seeded_run.run_dir, out / "runs" / "spectral-codistillation-seed1")
    base = " ".join(f"{k}={toml_value(v)}" for k, v in SEEDED.items())
    code = cli_main(["compare", "--methods", "spectral-codistillation",
                     "fedlgd:strategy='fedlgd' fedlgd-warmup-steps=20 fedlgd-server-steps=20 "
                     "fedlgd-client-gap=1 fedlgd-client-steps=5",
                     "--seeds", "1", "--output-dir", str(out), "-c", base])
    assert code == 0
    with (out / "comparison.csv").open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == \
        [("spectral-codistillation", "1", "finished:completed"),
         ("fedlgd", "1", "finished:completed")]
    kept = json.loads((out / "runs" / "spectral-codistillation-seed1" / "summary.json").read_text())
    assert kept == seeded_run.summary  # not run again
    report = (out / "comparison.md").read_text()
    assert "partitions identical across methods for each seed: yes" in report
    assert "| spectral-codistillation | 0.1 |" in report and "| fedlgd | 0.1 |" in report
    assert (out / "comparison.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["fedlgd-seed1",
                                                             "spectral-codistillation-seed1"]
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["strategy"] == row["method"]
        assert float(row["final_accuracy"]) == summary["final_accuracy"]
    # FedLGD matched gradients on the server after round 1, anchored round 2, and its
    # clients refined the virtual data they kept in their node state from round 1.
    fedlgd = metrics_lines(out / "runs" / "fedlgd-seed1")
    assert [m["clients_ok"] for m in fedlgd] == [10, 10]
    assert fedlgd[0]["gradient_match_last"] < fedlgd[0]["gradient_match_first"]
    assert "gradient_match_first" not in fedlgd[1]
    assert fedlgd[0]["fedlgd_warmup_seconds_sum"] > 0 == fedlgd[0]["fedlgd_refine_seconds_sum"]
    assert fedlgd[1]["fedlgd_refine_seconds_sum"] > 0 == fedlgd[1]["fedlgd_warmup_seconds_sum"]
    # Spectral's personalised models appear in the report's per-client table.
    assert "## Per-client accuracy" in report and "| spectral-codistillation | 0.1 |" in report
    # Each node saved what it keeps between rounds in the run folder, for a resumed run.
    for method in ("fedlgd", "spectral-codistillation"):
        saved = out / "runs" / f"{method}-seed1" / "node-state"
        assert sorted(p.name for p in saved.iterdir()) == [f"client-{i}" for i in range(10)]
        assert all(saved_rounds(saved / f"client-{i}") == [1, 2] for i in range(10))
