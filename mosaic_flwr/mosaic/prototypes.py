"""Per-class prototypes: k-means centres of a client's features, one set per class.

A client maps its samples through the current global model's feature extractor
and, class by class, uploads a few k-means centres instead of the features.
Two rules keep every uploaded vector an aggregate, never one sample's feature:
a centre must average at least ``min_cluster`` samples (smaller clusters are
dropped), and a class with fewer than ``min_cluster`` samples sends nothing. A
class with fewer samples than ``k`` sends its mean. Prototypes are computed
afresh in each round that asks for them (the reference accumulated them over
rounds, mixing features of old global models).
"""

from __future__ import annotations

import torch


def kmeans(points: torch.Tensor, k: int, rng: torch.Generator, iterations: int = 25
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding: (centres (k', D), assignment (N,)).

    Clusters that end up empty are removed, so ``k' <= k``.
    """
    points = points.float()
    n = len(points)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points ({n})")
    first = int(torch.randint(0, n, (1,), generator=rng))
    centres = [points[first]]
    dist = torch.cdist(points, points[first:first + 1]).squeeze(1).pow(2)
    for _ in range(1, k):
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full((n,), 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=rng))
        centres.append(points[nxt])
        dist = torch.minimum(dist, (points - points[nxt]).pow(2).sum(1))
    centre_t = torch.stack(centres)
    assign = torch.cdist(points, centre_t).argmin(1)
    for _ in range(iterations):
        sums = torch.zeros_like(centre_t).index_add_(0, assign, points)
        sizes = torch.bincount(assign, minlength=len(centre_t))
        keep = sizes > 0
        centre_t = sums[keep] / sizes[keep].unsqueeze(1)
        new_assign = torch.cdist(points, centre_t).argmin(1)
        if torch.equal(new_assign, assign) and bool(keep.all()):
            break
        assign = new_assign
    return centre_t, assign


def prototype_centres(features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int,
                      min_cluster: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes of every class present: (centres (P, D), their labels (P,))."""
    centres: list[torch.Tensor] = []
    centre_labels: list[torch.Tensor] = []
    for cls in range(num_classes):
        class_features = features[labels == cls].float()
        n = len(class_features)
        if n < min_cluster:
            continue
        num_centres = min(k, n // min_cluster) if n >= k else 1
        if num_centres <= 1:
            found = class_features.mean(0, keepdim=True)
        else:
            found, assign = kmeans(class_features, num_centres, rng)
            sizes = torch.bincount(assign, minlength=len(found))
            found = found[sizes >= min_cluster]
            if len(found) == 0:
                found = class_features.mean(0, keepdim=True)
        centres.append(found)
        centre_labels.append(torch.full((len(found),), cls, dtype=torch.int64))
    if not centres:
        dim = features.shape[1]
        return torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64)
    return torch.cat(centres), torch.cat(centre_labels)
