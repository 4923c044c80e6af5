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
                      "teacher_accuracy": 0.65, "student_accuracy_distilled": 0.6,
                      "student_accuracy_after": 0.6},
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
    assert "| mosaic | 0.1 | 0 | 0.5000 | 0.6500 | 0.6000 | 0.6000 | 0.7000 | yes | yes | 1 of 1 |" \
        in report
    assert "| mosaic | 0.1 | 1 | 0.5000 |  | 0.4900 | 0.4900 | 0.4700 | NO | NO | 0 of 1 |" in report
    assert "| fedavg | 0.1 | 0 |" not in report
