"""Evidence the server checks before it lets Mosaic's teacher change the global model.

Mosaic's teacher can be worse than its student: measured on ``digits`` with
half the clients per round, the teacher scored 0.368 on the test set while the
student it was distilled into scored 0.518, and distillation took the student
down to 0.362 (issue 15). The server may not look at test labels or client
data; the two checks use only what clients upload or report:

1. **The meta model on held-out prototypes.** Part of every (client, class)
   group of prototypes is held out (:func:`holdout_split`); the meta model
   trains on the rest and is used only if it classifies the held-out ones at
   least as well as the count-weighted ensemble of the experts does. Otherwise
   the teacher falls back to that ensemble.
2. **Federated evaluation of every change after the teacher.** The clients of
   the distillation round score, on their own data (Flower evaluate messages;
   each reply carries an accuracy and a count, as Flower's federated evaluation
   does), the student before distillation, the distilled student and the
   students in between (:func:`interpolate`: the weights moved 1/n, 2/n, ... of
   the way, ``mosaic-trust-mixes`` = n), and the server keeps the one with the
   highest pooled accuracy (:func:`pooled_accuracy`). A distillation on
   synthetic samples moves the student away from what it learnt on real data
   as it brings in the teacher's knowledge; part of the way often keeps more of
   both than either end (as weight-space ensembles of a model and its
   fine-tuned copy do, WiSE-FT). The clients score on the data they trained
   on, which favours the averaged student the round built from their models:
   the check errs towards not distilling. After each fine-tuning round the same
   check decides between the round's average and the model it started from.

A third check was tried and dropped: asking each client's own model to label
its generator's samples and distilling only when the teacher agreed with those
labels more than the student. On ``digits`` (Dirichlet 0.05, seeds 0-2) it
pointed the wrong way on every seed (``docs/results/quality.md``).

Each decision and the figures behind it go to the round's metrics and the log.
"""

from __future__ import annotations

from typing import Iterable

import torch
from flwr.app import ArrayRecord, Message

from ..aggregation import evaluate_reply_problem, reply_partition_id, screen_replies


def holdout_split(groups: torch.Tensor, share: float, rng: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held out) of items labelled by ``groups`` (N,) ints.

    From every group of n >= 2 items, ``round(share * n)`` items (at least one,
    at most n - 1) are held out at random; a group of one stays in training.
    With ``share = 0`` nothing is held out.
    """
    held = torch.zeros(len(groups), dtype=torch.bool)
    if share > 0:
        for group in torch.unique(groups):
            members = torch.nonzero(groups == group).flatten()
            n = len(members)
            if n < 2:
                continue
            k = min(n - 1, max(1, round(share * n)))
            held[members[torch.randperm(n, generator=rng)[:k]]] = True
    index = torch.arange(len(groups))
    return index[~held], index[held]


def local_scores(replies: Iterable[Message]) -> dict[int, tuple[float, int]]:
    """``{partition id: (local accuracy, number of examples)}`` from evaluate replies.

    Replies are screened as federated evaluation screens them
    (:func:`~mosaic_flwr.aggregation.screen_replies`): one with an error, without
    one MetricRecord holding a positive ``num-examples``, or whose
    ``local-accuracy`` is missing or not a number in [0, 1] is left out, so one
    bad reply cannot sway the pooled score.
    """
    def problem(msg: Message) -> str:
        reason = evaluate_reply_problem(msg, "num-examples")
        if reason:
            return reason
        accuracy = next(iter(msg.content.metric_records.values())).get("local-accuracy")
        if isinstance(accuracy, bool) or not isinstance(accuracy, (int, float)) \
                or not 0.0 <= accuracy <= 1.0:
            return f"local-accuracy must be a number in [0, 1], got {accuracy!r}"
        return ""

    usable, _ = screen_replies(replies, problem)
    scores = {}
    for reply in usable:
        metrics = next(iter(reply.content.metric_records.values()))
        scores[reply_partition_id(reply)] = (float(metrics["local-accuracy"]),
                                             int(metrics["num-examples"]))
    return scores


def pooled_accuracy(scores: dict[int, tuple[float, int]], clients: Iterable[int]) -> float:
    """Accuracy over the pooled examples of ``clients`` (each weighted by its count)."""
    pairs = [scores[client] for client in clients]
    total = sum(n for _, n in pairs)
    return sum(acc * n for acc, n in pairs) / total if total else 0.0


def interpolate(start: ArrayRecord, end: ArrayRecord, share: float) -> ArrayRecord:
    """The model ``share`` of the way from ``start`` to ``end``: every floating-point
    array ``(1 - share) * start + share * end``; other arrays (counters) are ``end``'s."""
    first, last = start.to_torch_state_dict(), end.to_torch_state_dict()
    return ArrayRecord({name: torch.lerp(first[name], value, share)
                        if value.is_floating_point() else value
                        for name, value in last.items()})
