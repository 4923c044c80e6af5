"""The README's drop-in example: MosaicStrategy in an app with its own model and data."""

import sys
from pathlib import Path

from flwr.app import Context, RecordDict
from harness import InlineGrid

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import existing_app  # noqa: E402  pylint: disable=wrong-import-position


def test_existing_app_runs_mosaic_with_its_own_model_and_client_loop():
    grid = InlineGrid(existing_app.NUM_CLIENTS, train=existing_app.client_train,
                      evaluate=existing_app.client_evaluate)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    existing_app.server_main(grid, context)
    tasks = [m.content["task"]["phase"] for m in grid.sent if "task" in m.content]
    # After a discarded distillation the last round trains as a FedAvg round ("train").
    kept = tasks[-1] == "finetune"
    assert tasks == ["warmup"] * 8 + ["distill"] * 4 + ["finetune" if kept else "train"] * 4
    # The federated checks: every client scored the five students of the distillation
    # round (before, 25/50/75% of the way, distilled) and the fine-tuning round's two
    # models (start, average).
    scored = [r for r in grid.replies if "local-accuracy" in r.content["metrics"]]
    assert len(scored) == (5 + 2) * existing_app.NUM_CLIENTS
    distill_replies = [r for r in grid.replies if "generator" in r.content.array_records]
    assert len(distill_replies) == existing_app.NUM_CLIENTS
    final = context.state["final"]
    assert set(final.keys()) == set(existing_app.MyNet().state_dict())
