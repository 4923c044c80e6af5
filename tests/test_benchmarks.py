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
