"""Mistakes caught in seconds: ``mosaic-flwr simulate`` and ``compare`` refuse a bad run
with one ``error:`` line and exit code 2 before anything starts (no SuperLink); the
ServerApp refuses a bad config on its own with one log line."""

from __future__ import annotations

import numpy as np
import pytest

from harness import serve_inline

from mosaic_flwr import cli, simulation
from mosaic_flwr.errors import ConfigError


@pytest.fixture
def no_superlink(monkeypatch):
    """Fails the test if a command gets as far as starting a SuperLink."""
    def refuse(*_, **__):
        raise AssertionError("a SuperLink was started")
    monkeypatch.setattr(simulation.LocalSuperLink, "start", refuse)


@pytest.fixture(scope="module")
def wrong_size_data(tmp_path_factory):
    """A save_to_disk folder of 16x16 images, for a data set of 8x8 ones (digits)."""
    import datasets  # pylint: disable=import-outside-toplevel

    folder = tmp_path_factory.mktemp("wrong-size")
    split = {"image": [np.zeros((16, 16), np.uint8)] * 20, "label": list(range(10)) * 2}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(split),
                          "test": datasets.Dataset.from_dict(split)}).save_to_disk(str(folder))
    return folder


def _cases(tmp_path, wrong_size_data):
    """(command line, what the one error line must name)."""
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("strategy: 'mosaic'\nnum-clients: [10\n")
    sim = ["simulate", "--output-dir", str(tmp_path / "out"), "-c"]
    return [
        (sim + ["num-clients=2000"], "num-clients=2000: must be <= the 1438 training samples"),
        (sim + [f"data-path='{a_file}'"], f"data-path {a_file} is a file, not a folder"),
        (sim + [f"data-path='{tmp_path / 'empty'}'"], f"data-path {tmp_path / 'empty'} is empty"),
        (sim + [f"data-path='{wrong_size_data}'"], "an image is 16x16, but dataset 'digits' is 8x8: set image-size=8"),
        (sim + ["device='cuda'"], "device='cuda': CUDA is not available on this machine"),
        (["simulate", "--gpus-per-client", "0.5"], "--gpus-per-client=0.5: CUDA is not available"),
        (sim + ["output-dir='/proc/x'"], "output-dir='/proc/x': cannot write there"),
        (sim + [f"preset='{bad_yaml}'"], f"{bad_yaml} is not valid YAML at line 3"),
        (sim + ["strategy=mosaic"], "--run-config='strategy=mosaic': the value is not TOML"),
        (["compare", "--methods", "fedavg", "--seeds", "0", "--output-dir", str(tmp_path / "c"),
          "-c", "device='cuda'"], "device='cuda': CUDA is not available"),
    ]


def test_each_mistake_is_one_error_line_and_exit_code_2(tmp_path, wrong_size_data,
                                                         no_superlink, capsys):
    import torch  # pylint: disable=import-outside-toplevel

    assert not torch.cuda.is_available()  # the CUDA cases assume a machine without a GPU
    for argv, message in _cases(tmp_path, wrong_size_data):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert message in err, (argv, err)


def test_an_invalid_config_fails_the_serverapp_before_anything_is_written(tmp_path, caplog):
    """The ServerApp's own checks (plain `flwr run` and deployments have no launcher to
    check first): one ERROR line naming key, value and rule; no run folder, no round."""
    with pytest.raises(ConfigError):
        serve_inline({"dirichlet-alpha": -1.0, "output-dir": str(tmp_path)})
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["invalid run config: dirichlet-alpha=-1.0: must be > 0"]
    assert not any("[ROUND" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_fails_before_its_results_folder_still_leaves_summary_json(
        tmp_path, monkeypatch):
    """The ServerApp may fail before it writes anything (plain `flwr run` semantics, a
    crash): the launcher still leaves summary.json, status failed and the error, in the
    folder it names."""
    log = ["Successfully started run 7\n",
           "\x1b[91mERROR \x1b[0m:   invalid run config: dirichlet-alpha=-1.0: must be > 0\n",
           "Traceback (most recent call last):\n"]

    class FakeFlwrRun:  # stands in for the `flwr run --stream` process
        def __init__(self, *_, **__):
            self.stdout = iter(log)

        def __enter__(self):
            return self

        def __exit__(self, *_):
            pass

        def wait(self):
            return 0

    class FakeSuperLink:
        env: dict = {}

        @staticmethod
        def run_status(run_id):
            assert run_id == 7
            return "finished:failed"

    monkeypatch.setattr(simulation.subprocess, "Popen", FakeFlwrRun)
    outcome = simulation.simulate({"dirichlet-alpha": -1.0}, superlink=FakeSuperLink(),
                                  output_dir=tmp_path, validate=False)
    assert outcome.status == "finished:failed" and outcome.run_dir.is_dir()
    summary = outcome.summary
    assert summary["status"] == "failed" and summary["flower_status"] == "finished:failed"
    assert summary["error"] == "invalid run config: dirichlet-alpha=-1.0: must be > 0"
    assert (outcome.run_dir / "flwr.log").read_text() == "".join(log)
