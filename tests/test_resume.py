"""Checkpoints and resuming: a run stopped at any point continues to the very result of
a run never stopped, and a folder that cannot be resumed is refused in one line.

The runs are the ServerApp's own code (:func:`mosaic_flwr.server.run_server`) on an
in-process grid (:func:`harness.serve_inline`); a crash stops everything at once, as
kill -9 does, and the resumed grid numbers its nodes anew, as a restarted simulation
does. ``tests/test_e2e.py`` kills a real ``flwr run`` and resumes it with
``mosaic-flwr simulate --resume``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from harness import MOSAIC, TINY, SimulatedCrash, serve_inline

from mosaic_flwr import checkpoint
from mosaic_flwr.checkpoint import (latest_checkpoint, load_checkpoint, save_atomic,
                                    write_checkpoint)
from mosaic_flwr.errors import ResumeError
from mosaic_flwr.node_state import saved_rounds

#: Mosaic over 4 rounds: warm-up rounds 1-2, distillation in round 3, fine-tuning round 4.
MOSAIC4 = {**TINY["mosaic"], "num-server-rounds": 4, "mosaic-warmup-rounds": 2}

CASES = {
    "fedavg": {**TINY["fedavg"], "num-server-rounds": 3},
    "fedgen": {**TINY["fedgen"], "num-server-rounds": 3},
    "fedrolex": {**TINY["fedrolex"], "num-server-rounds": 3},  # rolling width slices
    "mosaic": MOSAIC4,
    # The trust checks judge fine-tuning by the distillation round's clients: after a
    # restart they are found again by partition, on their new node ids. Two architectures:
    # the ResNet-8 group's average must reach its nodes, renumbered.
    # A distillation learning rate too small to change a prediction: the clients score the
    # distilled student as the one before, so it is kept and fine-tuning is checked.
    "mosaic-trust": {**MOSAIC4, "mosaic-trust": True, "mosaic-finetune-anchor": 1.0,
                     "client-models": "0-1:cnn,2-3:resnet8@0.25", "mosaic-distill-lr": 1e-9},
    # Client state kept between rounds (node-state, saved in the run folder): FedCOG's
    # previous local model, FedLGD's virtual images, Spectral's personalised models.
    "fedcog": TINY["fedcog"],
    "fedlgd": TINY["fedlgd"],
    "spectral": TINY["spectral-codistillation"],
    "spectral-memory": {**TINY["spectral-codistillation"], "node-state": "memory"},
}
assert not MOSAIC["mosaic-trust"]


def _overrides(case: str, folder: Path, name: str) -> dict:
    return {**CASES[case], "server-threads": 1, "output-dir": str(folder), "run-name": name}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each case run once without a stop: {case: run folder}."""
    done: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in done:
            folder = tmp_path_factory.mktemp(f"whole-{case}")
            serve_inline(_overrides(case, folder, "run"))
            done[case] = folder / "run"
        return done[case]
    return get


def crash_and_resume(case: str, folder: Path, crash_at: tuple[int, int]) -> Path:
    """Run until the grid crashes at ``crash_at`` (round, message), then resume."""
    with pytest.raises(SimulatedCrash):
        serve_inline(_overrides(case, folder, "run"), crash_at=crash_at)
    run_dir = folder / "run"
    assert not (run_dir / "summary.json").exists()  # killed: nothing was finished
    serve_inline({**_overrides(case, folder, "ignored"), "resume-from": str(run_dir)},
                 first_node_id=101)
    return run_dir


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case,crash_at", [
    ("fedavg", (3, 2)),
    ("fedgen", (3, 1)),
    ("fedrolex", (3, 2)),
    ("mosaic", (2, 3)),  # before the distillation round
    ("mosaic", (3, 4)),  # in it: while clients train their generators
    ("mosaic-trust", (4, 2)),  # after it, in the fine-tuning round its clients judge
    ("fedcog", (3, 3)),  # the round that synthesises against the previous local models
    ("fedlgd", (3, 2)),  # the round that refines the virtual images
    ("spectral", (3, 2)),
])
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(
        case, crash_at, tmp_path, uninterrupted):
    whole = uninterrupted(case)
    resumed = crash_and_resume(case, tmp_path, crash_at)
    expected, got = _metrics(whole), _metrics(resumed)
    rounds = CASES[case]["num-server-rounds"]
    assert [r["round"] for r in got] == list(range(1, rounds + 1))  # none lost, none twice
    assert [r["accuracy"] for r in got] == [r["accuracy"] for r in expected]
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["resumed_from_rounds"] == [crash_at[0] - 1]  # only the crashed round again
    assert summary["final_accuracy"] == json.loads(
        (whole / "summary.json").read_text())["final_accuracy"]
    final, final_whole = (torch.load(d / "final_model.pt") for d in (resumed, whole))
    assert final.keys() == final_whole.keys()
    assert all(torch.equal(final[k], final_whole[k]) for k in final)
    if case == "mosaic-trust":  # the fine-tuning check asked the same clients, same verdict
        assert got[-2]["distilled"] == 1.0
        for key in ("federated_check_clients", "finetune_kept", "federated_accuracy_average"):
            assert got[-1][key] == expected[-1][key]
        assert got[-1]["federated_check_clients"] == 4
    kept = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert kept == [f"round-{r:05d}.pt" for r in (rounds - 1, rounds)]  # checkpoint-keep=2
    if case in ("fedcog", "fedlgd", "spectral"):  # each node's state: the newest 3 rounds
        for pid in range(CASES[case]["num-clients"]):
            assert saved_rounds(resumed / "node-state" / f"client-{pid}") == [1, 2, 3]


def test_without_saved_node_state_a_resumed_run_starts_the_personalised_models_afresh(
        tmp_path, uninterrupted):
    """The control for the cases above: with ``node-state='memory'`` the personalised
    models of rounds 1-2 are lost in the crash and the resumed round 3 differs."""
    resumed = crash_and_resume("spectral-memory", tmp_path, (3, 2))
    expected, got = _metrics(uninterrupted("spectral")), _metrics(resumed)
    assert not (resumed / "node-state").exists()
    assert [r["loss"] for r in got][:2] == [r["loss"] for r in expected][:2]
    assert got[2]["loss"] != expected[2]["loss"]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """A FedAvg run folder killed in round 3 (checkpoints of rounds 1 and 2)."""
    folder = tmp_path_factory.mktemp("crashed")
    with pytest.raises(SimulatedCrash):
        serve_inline(_overrides("fedavg", folder, "run"), crash_at=(3, 1))
    return folder / "run"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _refused(run_dir: Path, message: str, **changes) -> None:
    """Resuming ``run_dir`` fails with one line holding ``message``; nothing is touched."""
    before = _files(run_dir) if run_dir.is_dir() else {}
    overrides = {**_overrides("fedavg", run_dir.parent, "x"), "resume-from": str(run_dir),
                 **changes}
    with pytest.raises(ResumeError) as err:
        serve_inline(overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert (_files(run_dir) if run_dir.is_dir() else {}) == before


def test_a_checkpoint_from_another_configuration_is_refused(crashed):
    _refused(crashed, "seed=0 in the checkpoint, 1 now", seed=1)


def test_a_folder_without_a_checkpoint_is_refused(crashed, tmp_path):
    _refused(tmp_path, f"{tmp_path / 'checkpoints'}: no checkpoint to resume from")
    _refused(tmp_path / "nowhere", "no such run folder")


def test_a_truncated_checkpoint_is_refused_naming_the_file(crashed, tmp_path):
    copy = tmp_path / "run"
    for name, data in _files(crashed).items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    newest = latest_checkpoint(copy)
    newest.write_bytes(newest.read_bytes()[:1000])
    _refused(copy, f"{newest}: truncated or corrupt checkpoint")


def test_a_checkpoint_of_another_code_version_is_refused(crashed, monkeypatch):
    monkeypatch.setattr(checkpoint, "__version__", "9.9.9")
    _refused(crashed, "resume it with that version")


def test_a_completed_run_is_not_resumed(uninterrupted):
    _refused(uninterrupted("fedavg"), "the run completed; there is nothing to resume")


def test_checkpoints_are_written_whole_and_only_the_newest_are_kept(tmp_path):
    for rnd in range(1, 5):
        write_checkpoint(tmp_path, rnd, {"config": {"seed": rnd}}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "round-00003.pt", "round-00004.pt"]  # and no temporary file left behind
    payload = load_checkpoint(latest_checkpoint(tmp_path), {"seed": 4, "output-dir": "/elsewhere"})
    assert payload["round"] == 4
    save_atomic({"a": 1}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

