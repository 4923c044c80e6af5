"""The benchmarks run: the GPU benchmark's CI-sized CPU form end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_gpu_benchmark_runs_on_the_cpu_in_ci_size(tmp_path):
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                   os.environ.get("PATH", "")])}
    # Mosaic alone (one flwr run keeps the suite short); the ratio needs FedAvg beside it.
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu",
                             "--methods", "mosaic", "--json", str(tmp_path / "speed.json")],
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    assert report["setting"]["device"] == "cpu"
    summary = {row["method"]: row for row in report["summary"]}
    assert set(summary) == {"mosaic"} and "x_fedavg" not in summary["mosaic"]
    for method, runs in report["runs"].items():
        (run,) = runs
        assert run["wall"] > sum(run["round_seconds"]) > 0 and run["peak_gb"] > 0.1
        assert 0.0 <= run["final_acc"] <= 1.0 and len(run["round_seconds"]) == 2, method
    mosaic = report["runs"]["mosaic"][0]
    assert mosaic["gen"] > 0 and mosaic["distill"] > 0 and "student_accuracy_after" in mosaic
    assert "| mosaic | 1 |" in result.stdout


def test_compute_benchmark_counts_each_phase_against_fedavg(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import compute  # pylint: disable=import-outside-toplevel

    compute.main(["--dataset", "digits", "--train-size", "100", "--clients", "2",
                  "--rounds", "1", "--local-epochs", "1", "--generator-steps", "3",
                  "--distill-steps", "4", "--pool-batches", "2"])
    rows = {line.split(" | ")[0].strip("| "): [float(v) for v in line.strip(" |").split(" | ")[1:]]
            for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| phase")}
    parts = [rows[name] for name in ("client generators", "teacher (experts on the pool)",
                                     "distillation (student steps)")]
    assert all(gflop > 0 for gflop, _ in parts)
    total, share = rows["Mosaic's additions"]
    assert total == pytest.approx(sum(p[0] for p in parts), abs=0.2)
    # Twice the generator steps, twice the generators' share (the count is exact).
    compute.main(["--dataset", "digits", "--train-size", "100", "--clients", "2",
                  "--rounds", "1", "--local-epochs", "1", "--generator-steps", "6",
                  "--distill-steps", "4", "--pool-batches", "2"])
    doubled = next(line for line in capsys.readouterr().out.splitlines()
                   if line.startswith("| client generators"))
    assert float(doubled.split(" | ")[2].strip(" |")) == pytest.approx(2 * parts[0][1], rel=0.02)
    assert share > 0
