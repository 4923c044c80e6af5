"""The comparison command's parsing and statistics (the real runs are in test_e2e)."""

import json

import pytest

from mosaic_flwr.compare import (METHODS, Method, markdown_table, parse_method,
                                 partitions_identical, summarise)


def test_methods_are_named_or_defined_inline():
    assert parse_method("mosaic-no-meta") == Method(
        "mosaic-no-meta", {"strategy": "mosaic", "mosaic-meta-model": False})
    custom = parse_method("hot:strategy='mosaic' mosaic-temperature=4.0")
    assert custom == Method("hot", {"strategy": "mosaic", "mosaic-temperature": 4.0})
    with pytest.raises(ValueError, match="unknown method 'fedsgd'"):
        parse_method("fedsgd")
    # Every named method is a registered strategy plus valid overrides, with a description.
    from mosaic_flwr.compare import DESCRIPTIONS  # pylint: disable=import-outside-toplevel
    from mosaic_flwr.config import RunConfig  # pylint: disable=import-outside-toplevel
    for name, overrides in METHODS.items():
        RunConfig.from_mapping({**overrides, "num-server-rounds": 20})
        assert name in DESCRIPTIONS
    assert {"fedavg", "fedprox", "mosaic", "fedgen", "fedftg", "dense", "feddf",
            "fedcog"} <= set(METHODS)


def rows_for(finals: dict[str, list], tmp_path=None):
    rows = []
    for method, values in finals.items():
        for seed, final in enumerate(values):
            rows.append({"method": method, "alpha": 0.1, "seed": seed,
                         "status": "finished:completed" if final is not None else "finished:failed",
                         "final_accuracy": final, "best_accuracy": final, "wall_seconds": 10.0,
                         "run_dir": str(tmp_path / f"{method}-{seed}") if tmp_path else "/nonexistent"})
    return rows


def test_summary_is_mean_and_sample_std_over_completed_seeds():
    groups = summarise(rows_for({"a": [0.4, 0.6, None], "b": [0.9]}))
    assert groups[("a", 0.1)]["mean"] == pytest.approx(0.5)
    assert groups[("a", 0.1)]["std"] == pytest.approx(0.141421, rel=1e-5)
    assert groups[("a", 0.1)]["failed"] == 1
    assert groups[("b", 0.1)]["std"] == 0.0


def test_report_table_lists_every_method_with_its_spread():
    report = markdown_table(rows_for({"fedavg": [0.4, 0.6], "mosaic": [0.8, 0.9]}),
                            [Method("fedavg", {"strategy": "fedavg"}),
                             Method("mosaic", {"strategy": "mosaic"})],
                            {"partitioner": "dirichlet", "dirichlet-alpha": 0.1})
    assert "| fedavg | 0.1 | 0.5000 ± 0.1414 | 0.4000, 0.6000 | 2 | 10 |" in report
    assert "| mosaic | 0.1 | 0.8500 ± 0.0707 |" in report
    assert "dirichlet partitions, 10 clients, 20 rounds x 5 local epochs" in report


def test_report_has_per_client_accuracy_over_seeds_where_runs_recorded_it():
    rows = rows_for({"fedavg": [0.4, 0.6], "mosaic": [0.8]})
    for row, (mean, worst) in zip(rows, [(0.5, 0.2), (0.7, 0.4), (None, None)]):
        row.update(personal_mean=mean, personal_worst10=worst)  # mosaic: a run from before
    report = markdown_table(rows, [Method("fedavg", {"strategy": "fedavg"}),
                                   Method("mosaic", {"strategy": "mosaic"})], {})
    assert "| fedavg | 0.1 | 0.6000 ± 0.1414 | 0.3000 ± 0.1414 | 2 |" in report
    assert "| mosaic | 0.1 | 0.8000" in report  # its final accuracy, no per-client row
    assert report.count("| mosaic | 0.1 |") == 1


def test_partition_check_spots_a_difference(tmp_path):
    rows = rows_for({"a": [0.5], "b": [0.5]}, tmp_path)
    for row in rows:
        run = tmp_path / f"{row['method']}-0"
        run.mkdir()
        (run / "partitions.json").write_text(json.dumps({"clients": [[1, 2]]}))
    assert partitions_identical(rows)
    (tmp_path / "b-0" / "partitions.json").write_text(json.dumps({"clients": [[2, 1]]}))
    assert not partitions_identical(rows)


def test_report_lists_each_distillation_round_and_checks_the_two_rules(tmp_path):
    rows = rows_for({"fedavg": [0.5], "mosaic": [0.7, 0.8]}, tmp_path)
    lines = {
        "mosaic-0": [{"round": 1, "accuracy": 0.5},
                     {"round": 2, "accuracy": 0.6, "student_accuracy_before": 0.5,
                      "teacher_accuracy": 0.65, "student_accuracy_distilled": 0.55,
                      "distill_share": 0.25, "student_accuracy_after": 0.6},
                     {"round": 3, "accuracy": 0.7, "finetune_kept": 1.0}],
        "mosaic-1": [{"round": 1, "accuracy": 0.5},
                     {"round": 2, "accuracy": 0.49, "student_accuracy_before": 0.5,
                      "student_accuracy_after": 0.49},
                     {"round": 3, "accuracy": 0.47, "finetune_kept": 0.0}],
        "fedavg-0": [{"round": 1, "accuracy": 0.5}]}
    for name, metrics in lines.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics))
    report = markdown_table(rows, [Method("fedavg", {"strategy": "fedavg"}),
                                   Method("mosaic", {"strategy": "mosaic"})], {})
    assert "| mosaic | 0.1 | 0 | 0.5000 | 0.6500 | 0.5500 | 0.2500 | 0.6000 | 0.7000 | yes | yes " \
        "| 1 of 1 |" in report
    assert "| mosaic | 0.1 | 1 | 0.5000 |  | 0.4900 |  | 0.4900 | 0.4700 | NO | NO | 0 of 1 |" \
        in report
    assert "| fedavg | 0.1 | 0 |" not in report


def test_a_stopped_comparison_run_again_keeps_finished_runs_and_continues_the_rest(
        tmp_path, monkeypatch):
    """The same command into the same folder: a completed run is kept, a run with a
    checkpoint resumes from it, a run stopped before its first checkpoint is set aside
    and run anew; a folder holding other settings is refused before anything runs."""
    from mosaic_flwr import compare  # pylint: disable=import-outside-toplevel
    from mosaic_flwr.checkpoint import write_checkpoint  # pylint: disable=import-outside-toplevel
    from mosaic_flwr.simulation import resolve_overrides  # pylint: disable=import-outside-toplevel

    base = {"num-server-rounds": 2, "num-clients": 4}
    methods = [parse_method(m) for m in ("fedavg", "fedprox", "fedgen")]
    first = compare.plan_comparison(methods, [0], [0.3], base, tmp_path)
    assert [r.state for r in first] == ["new", "new", "new"]
    # What a killed first invocation left: fedavg completed, fedprox after round 1's
    # checkpoint, FedGen killed in round 1.
    for run in first:
        run.run_dir.mkdir(parents=True)
        config = resolve_overrides(run.overrides).to_mapping()
        del config["fedlgd-temperature"]  # written by a version before that key: its default
        (run.run_dir / "config.json").write_text(json.dumps(config))
    (first[0].run_dir / "summary.json").write_text(json.dumps(
        {"status": "completed", "final_accuracy": 0.7, "best_accuracy": 0.7,
         "wall_seconds": 3.0}))
    write_checkpoint(first[1].run_dir, 1, {"config": resolve_overrides(
        first[1].overrides).to_mapping(), "recorder": {}}, keep=2)

    ran: list[dict] = []

    def simulate(overrides, **_):  # stands in for a real run: records what it was asked
        ran.append(overrides)
        run_dir = tmp_path / "runs" / overrides["run-name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(
            {"status": "completed", "final_accuracy": 0.8, "best_accuracy": 0.8,
             "wall_seconds": 5.0}))

    class NoSuperLink:
        def __init__(self, **_):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_):
            pass

    monkeypatch.setattr(compare, "simulate", simulate)
    monkeypatch.setattr(compare, "LocalSuperLink", NoSuperLink)
    again = compare.plan_comparison(methods, [0], [0.3], base, tmp_path)
    assert [r.state for r in again] == ["completed", "resume", "restart"]
    rows = compare.run_comparison(again, base, tmp_path)
    assert [o["run-name"] for o in ran] == [
        "fedprox-alpha0.3-seed0", "fedgen-alpha0.3-seed0"]
    assert ran[0]["resume-from"] == str(first[1].run_dir)  # continued, not restarted
    assert "resume-from" not in ran[1]
    assert (tmp_path / "runs" / "fedgen-alpha0.3-seed0.stopped-1"
            / "config.json").is_file()  # set aside, not deleted
    assert [(r["method"], r["status"], r["final_accuracy"]) for r in rows] == [
        ("fedavg", "finished:completed", 0.7), ("fedprox", "finished:completed", 0.8),
        ("fedgen", "finished:completed", 0.8)]
    assert "| fedavg | 0.3 | 0.7000" in (tmp_path / "comparison.md").read_text()

    with pytest.raises(ValueError, match="num-server-rounds=2 there, 3 now"):
        compare.plan_comparison(methods, [0], [0.3], {**base, "num-server-rounds": 3}, tmp_path)
