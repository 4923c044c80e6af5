"""Result files: metrics lines, partitions, summary fields, plot, wandb offline."""

import json

import numpy as np

from mosaic_flwr.config import RunConfig
from mosaic_flwr.results import RunRecorder, make_run_dir


def record_three_rounds(tmp_path, **changes):
    config = RunConfig.from_mapping({"output-dir": str(tmp_path), "run-name": "r",
                                     "num-server-rounds": 3, **changes})
    recorder = RunRecorder(make_run_dir(config), config)
    recorder.write_partitions(np.array([[3, 0], [1, 2]]), config.partitioner)
    recorder.on_initial(0.1, 2.3)
    for rnd, acc in enumerate((0.5, 0.8, 0.7), start=1):
        recorder.on_round_end(rnd, acc, 1.0 / rnd, clients_ok=2)
    return recorder, recorder.finish()


def test_summary_holds_the_required_fields_and_values(tmp_path):
    recorder, summary = record_three_rounds(tmp_path)
    on_disk = json.loads((recorder.run_dir / "summary.json").read_text())
    assert on_disk == summary
    assert summary["final_accuracy"] == 0.7 and summary["best_accuracy"] == 0.8
    assert summary["initial_accuracy"] == 0.1
    for key in ("strategy", "dataset", "partitioner", "dirichlet_alpha", "num_clients", "seed",
                "model", "wall_seconds"):
        assert key in summary
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3]
    assert set(summary["rounds"][0]) == {"round", "accuracy", "loss", "seconds"}
    assert summary["status"] == "completed"


def test_metrics_file_has_one_line_per_round(tmp_path):
    recorder, _ = record_three_rounds(tmp_path)
    lines = [json.loads(line) for line in (recorder.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert lines[1]["accuracy"] == 0.8 and lines[1]["clients_ok"] == 2


def test_partitions_and_plot_are_written(tmp_path):
    recorder, _ = record_three_rounds(tmp_path)
    partitions = json.loads((recorder.run_dir / "partitions.json").read_text())
    assert partitions["clients"][1] == {"partition_id": 1, "num_examples": 3, "label_counts": [1, 2]}
    assert (recorder.run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_with_the_same_name_does_not_overwrite_the_first(tmp_path):
    first, _ = record_three_rounds(tmp_path)
    second, _ = record_three_rounds(tmp_path)
    assert first.run_dir != second.run_dir
    assert (first.run_dir / "summary.json").exists() and (second.run_dir / "summary.json").exists()


def test_wandb_logs_offline_with_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    recorder, _ = record_three_rounds(tmp_path, wandb=True)
    runs = list((recorder.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))
