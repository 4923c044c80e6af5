"""FedLGD (Huang et al., TMLR 2024): federated learning on local and global virtual data.

Clients train on small synthetic ("virtual") data sets instead of their real
data, and the server keeps a global virtual set that anchors them:

1. **Local virtual data** (client, first round): ``images_per_class`` images per
   class the client holds, drawn from a Gaussian with that class's per-channel
   mean and spread (or real images of the class, ``init='real'``), then refined by *distribution matching*: the mean features
   of the virtual images of a class, under a freshly initialised network each
   step, should match those of a batch of its real images (``warmup_steps``);
   both batches take the same random shift (and flip where the data set allows
   it) in each step. They stay in the node's state and never leave the node.
2. **Iterative distribution matching** (client, every ``client_gap`` rounds): the
   same matching under the received global model, which carries what every
   client learnt into the local virtual data (``client_steps``).
3. **Local training** on the local virtual data together with the global virtual
   set the server sent; outside the server's update rounds a supervised
   contrastive term (weight ``anchor_weight``) pulls a batch's features towards
   those of the global virtual images of the same class.
4. **Federated gradient matching** (server, every ``server_gap`` rounds, after
   averaging): the global virtual images are optimised so that the gradient
   they induce on the round's starting global model points where the round's
   update went (``(w_old - w_new) / lr``, compared layer by layer, row by row,
   by cosine distance).

What leaves a client: its trained model weights and scalar metrics, as under
FedAvg (the server derives the aggregated gradient from the weights). What the
server sends besides the model: the global virtual images and their labels,
synthesised from model updates alone. The reference code does the same; it
initialises the global set from the clients' per-class pixel statistics,
which would be a further upload: here it starts from noise in the normalised
input space (the data set's per-channel statistics), and only the server's
images per class and labels are known to it.

Deviations (each commented where it lives): a client holding fewer real images
of a class than ``images_per_class`` gets that many virtual ones; the real
images of a class in a matching step are drawn with replacement (the reference
draws distinct ones); the siamese augmentation is a shift and flip (the
reference's DSA also changes colour, scale and rotation and cuts out patches);
distribution matching runs the network in eval mode (the reference's ConvNet
uses instance norm, where the mode does not matter); local training uses the
run's optimiser, batch size and ``local-epochs`` / ``local-steps`` like every
other method here; replies are weighted by the number of virtual images a
client trained on (the reference averages uniformly); the warm-up is shorter
and its image learning rate larger (``FedLGDSettings``).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from flwr.app import Array, ArrayRecord
from torch import nn
from torch.nn import functional as F

from ..client_part import ClientPart, ClientWork, TrainingData
from ..config import RunConfig
from ..data.datasets import DatasetSpec, dataset_spec
from ..models import Classifier
from ..records import ClientUpload, TrainTask
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options
from ..training import Regulariser, autocast, fast_layout, frozen
from .settings import FedLGDSettings

#: The instruction record with the global virtual set (``images``, ``labels``).
GLOBAL_VIRTUAL_RECORD = "fedlgd-global-virtual"
#: The node-state record with a client's local virtual set; it never leaves the node.
LOCAL_VIRTUAL_RECORD = "fedlgd-local-virtual"


# ----------------------------------------------------------------- distribution matching
def class_gaussian_images(images: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                          rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``counts[c]`` images per class c, each pixel drawn from a Gaussian with the class's
    per-channel mean and standard deviation over ``images`` (normalised inputs)."""
    out, out_labels = [], []
    for c, n in enumerate(counts.tolist()):  # host read: once
        if n == 0:
            continue
        real = images[labels == c]
        mean = real.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
        std = (real.std(dim=(0, 2, 3)) if len(real) > 1
               else torch.ones(real.shape[1], device=real.device)).view(1, -1, 1, 1)
        noise = torch.randn(n, *real.shape[1:], generator=rng).to(real.device)
        out.append(mean + std * noise)
        out_labels.append(torch.full((n,), c, dtype=torch.long, device=real.device))
    return torch.cat(out), torch.cat(out_labels)


def real_images(images: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor,
                rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``counts[c]`` distinct real images of each class c, drawn at random."""
    chosen = [idx[torch.randperm(len(idx), generator=rng)[:n].to(idx.device)]
              for c, n in enumerate(counts.tolist()) if n > 0  # host read: once
              for idx in [torch.nonzero(labels == c).flatten()]]
    picked = torch.cat(chosen)
    return images[picked].clone(), labels[picked].clone()


def siamese_augment(batches: list[torch.Tensor], padding: int, hflip: bool,
                    rng: torch.Generator) -> list[torch.Tensor]:
    """The same random shift (up to ``padding`` pixels, zero fill) and, with ``hflip``, the
    same flip applied to every batch: real and virtual images are compared under one view."""
    dy, dx = (torch.randint(-padding, padding + 1, (2,), generator=rng).tolist()
              if padding > 0 else (0, 0))
    flip = hflip and bool(torch.rand((), generator=rng) < 0.5)
    out = []
    for x in batches:
        if dy or dx:
            height, width = x.shape[-2:]
            x = F.pad(x, (padding, padding, padding, padding))
            x = x[..., padding + dy:padding + dy + height, padding + dx:padding + dx + width]
        out.append(x.flip(-1) if flip else x)
    return out


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, d) mean feature of each class in ``labels`` (zero rows for absent classes)."""
    sums = torch.zeros(num_classes, features.shape[1], device=features.device,
                       dtype=features.dtype).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)
    return sums / counts.unsqueeze(1).to(features.dtype)


def mean_feature_distance(embed: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                          real_labels: torch.Tensor, virtual: torch.Tensor,
                          virtual_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Distribution matching's loss: over the classes of ``virtual_labels``, the summed
    squared distance between the mean features of the real and of the virtual images."""
    with torch.no_grad():
        real_means = class_means(embed(real).float(), real_labels, num_classes)
    virtual_means = class_means(embed(virtual).float(), virtual_labels, num_classes)
    present = torch.bincount(virtual_labels, minlength=num_classes) > 0
    return ((real_means - virtual_means).pow(2).sum(1) * present).sum()  # no mask: no sync


def distribution_matching(virtual: torch.Tensor, virtual_labels: torch.Tensor,
                          images: torch.Tensor, labels: torch.Tensor,
                          network: Callable[[], Classifier], steps: int,
                          settings: FedLGDSettings, spec: DatasetSpec, rng: torch.Generator,
                          amp: bool = True, cpu_bf16: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` steps of distribution matching on the virtual images (a new tensor is
    returned); ``network()`` gives the frozen feature extractor of each step (a fresh one
    each call, or always the global model), run under ``amp`` (CUDA) or ``cpu_bf16``
    (:func:`~mosaic_flwr.training.autocast`); the images are optimised in float32.
    Returns (virtual, first loss, last loss)."""
    virtual = virtual.detach().clone().requires_grad_(True)
    optimiser = torch.optim.SGD([virtual], lr=settings.image_lr, momentum=0.5)
    by_class = {c: torch.nonzero(labels == c).flatten()
                for c in virtual_labels.unique().tolist()}
    first = last = torch.zeros((), device=virtual.device)
    for step in range(steps):
        net = network()
        picks = [idx[torch.randint(0, len(idx), (min(len(idx), settings.real_batch_size),),
                                   generator=rng).to(idx.device)]
                 for idx in by_class.values()]
        chosen = torch.cat(picks)
        real, syn = siamese_augment([images[chosen], virtual], spec.crop_padding, spec.hflip, rng)
        with autocast(virtual.device, amp, cpu_bf16):
            loss = mean_feature_distance(net.features, real, labels[chosen], syn,
                                         virtual_labels, spec.num_classes)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step == 0:
            first = loss.detach()
        last = loss.detach()
    return virtual.detach(), first, last


def fresh_networks(build: Callable[[int], Classifier], count: int, device: torch.device,
                   rng: torch.Generator) -> Callable[[], Classifier]:
    """A new, frozen, freshly initialised network at each call (``build(seed)``), for
    ``count`` calls, seeded from ``rng``."""
    seeds = iter(torch.randint(0, 2**31 - 1, (count,), generator=rng).tolist())
    return lambda: frozen(build(next(seeds)), device)


def fixed_network(model: Classifier, device: torch.device) -> Callable[[], Classifier]:
    """``model``, frozen, at every call."""
    model = frozen(model, device)
    return lambda: model


# ----------------------------------------------------------------- the anchor
def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, one view, base temperature equal to
    ``temperature``): for each sample, minus the mean log-probability, under a softmax over
    every other sample of cosine similarity / temperature, of the samples of its class;
    a sample alone in its class adds 0 (and still counts in the mean), as in the reference."""
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)
    return -(pos_log_prob / positives.sum(1).clamp_min(1)).mean()


def anchor_regulariser(global_images: torch.Tensor, global_labels: torch.Tensor,
                       settings: FedLGDSettings) -> Regulariser:
    """FedLGD's anchor: the contrastive loss between a training batch's features and the
    global virtual set's features (both under the model being trained), weighted."""

    def regulariser(model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # pylint: disable=unused-argument
                    logits: torch.Tensor) -> torch.Tensor:
        features = torch.cat([model.features(x), model.features(global_images)])
        return settings.anchor_weight * supervised_contrastive(
            features, torch.cat([y, global_labels]), settings.temperature)

    return regulariser


# ----------------------------------------------------------------- gradient matching
def gradient_distance(grads: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Summed over layers and output units: 1 - cosine similarity of the two gradients of
    each unit's weights (a conv filter, a linear row); 1-d parameters do not count."""
    total = torch.zeros((), device=grads[0].device)
    for g, t in zip(grads, targets):
        if g.dim() < 2:
            continue
        g, t = g.reshape(len(g), -1).float(), t.reshape(len(t), -1).float()
        total = total + (1 - (g * t).sum(1) / (g.norm(dim=1) * t.norm(dim=1) + 1e-6)).sum()
    return total


def gradient_matching(model: Classifier, targets: list[torch.Tensor], images: torch.Tensor,
                      labels: torch.Tensor, steps: int, lr: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` SGD steps (momentum 0.5) on ``images`` so that the cross-entropy gradient
    they induce on ``model``'s weights (the parameters of 2 or more dimensions, in order)
    matches ``targets`` under :func:`gradient_distance`. Returns (images, first, last loss)."""
    params = [p for p in model.parameters() if p.dim() >= 2]
    images = images.detach().clone().requires_grad_(True)
    optimiser = torch.optim.SGD([images], lr=lr, momentum=0.5)
    model.train()
    first = last = torch.zeros((), device=images.device)
    for step in range(steps):
        loss_syn = F.cross_entropy(model(images), labels)
        grads = torch.autograd.grad(loss_syn, params, create_graph=True)
        loss = gradient_distance(list(grads), targets)
        # Only the images' gradient: the model's weights take none (and cost nothing).
        (images.grad,) = torch.autograd.grad(loss, [images])
        optimiser.step()
        if step == 0:
            first = loss.detach()
        last = loss.detach()
    return images.detach(), first, last


def round_update(before: Classifier, after: Classifier, lr: float) -> list[torch.Tensor]:
    """The round's aggregated gradient as FedLGD reads it: ``(w_before - w_after) / lr`` for
    each weight of 2 or more dimensions."""
    return [(b.detach() - a.detach()) / lr
            for b, a in zip(before.parameters(), after.parameters()) if b.dim() >= 2]


# ----------------------------------------------------------------- server
class FedLGDStrategy(TaskStrategy):
    """FedLGD: FedAvg of models trained on virtual data, plus the server's global virtual
    set, updated by federated gradient matching every ``server_gap`` rounds and sent to
    every client with each instruction.

    Parameters
    ----------
    model_fn : Callable[[], Classifier]
        Builds the global model.
    settings : FedLGDSettings (default: FedLGDSettings())
    input_shape : tuple[int, int, int]
        (channels, height, width) of the classifier's inputs.
    client_lr : float (default: 0.05)
        The clients' learning rate: the round's update divided by it is the gradient
        the global virtual set must induce (the cosine distance ignores the scale).
    **kwargs
        Passed to :class:`~mosaic_flwr.task_strategy.TaskStrategy` and FedAvg.
    """

    def __init__(self, model_fn: Callable[[], Classifier], settings: FedLGDSettings | None = None,
                 *, input_shape: tuple[int, int, int], client_lr: float = 0.05,
                 **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        self.settings = settings or FedLGDSettings()
        self.settings.check()
        self.client_lr = client_lr
        per_class = self.settings.global_images_per_class
        self.global_labels = torch.arange(self.num_classes).repeat_interleave(per_class)
        # Noise in the normalised input space: the data set's per-channel statistics.
        self.global_images = torch.randn(len(self.global_labels), *input_shape,
                                         generator=self.rng)

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "FedLGDStrategy":
        """The strategy for a run config."""
        spec = dataset_spec(config)
        return cls(model_fn_for(config), config.fedlgd,
                   input_shape=(spec.channels, spec.image_size, spec.image_size),
                   client_lr=config.learning_rate, **server_options(config, score_fn), **kwargs)

    def task_for(self, server_round: int) -> TrainTask:
        """Train on virtual data: refine it first in the client's rounds, anchor outside the
        server's update rounds (the round's flags travel in the settings)."""
        s = self.settings
        update = s.server_update(server_round)
        return TrainTask(phase="gradient-matching" if update else "anchored", objective="fedlgd",
                         settings={**s.to_mapping(), "anchor": not update,
                                   "refine": s.client_refine(server_round)})

    def instruction_records(self, server_round: int) -> dict[str, ArrayRecord]:
        """The global virtual set, with every instruction."""
        return {GLOBAL_VIRTUAL_RECORD: ArrayRecord({
            "images": Array(self.global_images.numpy()),
            "labels": Array(self.global_labels.numpy())})}

    def server_step(self, server_round: int, uploads: list[ClientUpload], arrays: ArrayRecord
                    ) -> tuple[ArrayRecord, dict[str, float]]:
        """In the update rounds, match the global virtual set's gradient on the round's
        starting model to the round's aggregated update."""
        s = self.settings
        if not s.server_update(server_round) or not uploads:
            return arrays, {}
        start = time.monotonic()
        before = fast_layout(self.global_model(self.round_start))
        after = self.global_model(arrays)
        images, first, last = gradient_matching(
            before, round_update(before, after, self.client_lr),
            self.global_images.to(self.device), self.global_labels.to(self.device),
            s.server_steps, s.global_image_lr)
        self.global_images = images.cpu()
        return arrays, {"gradient_match_first": float(first), "gradient_match_last": float(last),
                        "gradient_match_seconds": time.monotonic() - start}

    def state_dict(self) -> dict[str, Any]:
        """The base state and the global virtual images."""
        return {**super().state_dict(), "global_images": self.global_images.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.global_images = state["global_images"].clone()


# ----------------------------------------------------------------- client
class FedLGDClient(ClientPart):
    """FedLGD's client part: build or refine the local virtual set, then train on it and
    the global virtual set (with the anchor when the task asks for it)."""

    def before_training(self, work: ClientWork) -> Regulariser | None:
        setup, rng, metrics = work.setup, work.rng, work.metrics
        settings = FedLGDSettings.from_mapping(work.task.settings)
        device, spec, labels = setup.device, setup.spec, setup.labels
        start = time.monotonic()
        stored = setup.context.state.array_records.get(LOCAL_VIRTUAL_RECORD)
        refine = bool(work.task.settings.get("refine", False))
        # The real images are read only to build or refine the virtual ones.
        images = setup.transform.normalise(setup.images) if stored is None or refine else None
        if stored is None:  # first round on this node (or after a restart: built anew)
            counts = torch.bincount(labels, minlength=spec.num_classes).clamp_max(
                settings.images_per_class)
            virtual, virtual_labels = (real_images if settings.init == "real"
                                       else class_gaussian_images)(images, labels, counts, rng)
            steps = settings.warmup_steps
            network = fresh_networks(lambda seed: setup.global_spec.build(spec, seed=seed),
                                     steps, device, rng)
        else:
            virtual = torch.from_numpy(stored["images"].numpy()).to(device)
            virtual_labels = torch.from_numpy(stored["labels"].numpy()).to(device)
            steps = settings.client_steps if refine else 0
            # A copy: for a client of the global architecture it is the model it trains.
            network = (fixed_network(copy.deepcopy(setup.global_model(work.msg)), device)
                       if steps else None)
        first = last = torch.zeros(())
        if network is not None:
            virtual, first, last = distribution_matching(
                virtual, virtual_labels, images, labels, network, steps, settings, spec, rng,
                setup.config.amp, setup.config.cpu_bf16)
        # Every key in every reply (the server drops replies whose metric names differ
        # from the round's others): a node that lost its state warms up in any round.
        seconds = time.monotonic() - start
        metrics.update({
            "fedlgd-warmup-seconds": seconds if stored is None else 0.0,
            "fedlgd-refine-seconds": seconds if stored is not None and steps else 0.0,
            "fedlgd-matching-steps": steps, "fedlgd-matching-first": float(first),
            "fedlgd-matching-last": float(last)})
        work.context.state[LOCAL_VIRTUAL_RECORD] = ArrayRecord({
            "images": Array(virtual.cpu().numpy()), "labels": Array(virtual_labels.cpu().numpy())})
        sent = work.msg.content.array_records[GLOBAL_VIRTUAL_RECORD]
        global_images = torch.from_numpy(sent["images"].numpy()).to(device)
        global_labels = torch.from_numpy(sent["labels"].numpy()).to(device)
        metrics["fedlgd-virtual-images"] = len(virtual_labels)
        work.train_data = TrainingData(torch.cat([virtual, global_images]),
                                       torch.cat([virtual_labels, global_labels]),
                                       NormalisedInputs())
        if not work.task.settings.get("anchor", False):
            return None
        return anchor_regulariser(global_images, global_labels, settings)


class NormalisedInputs:
    """The batch transform of inputs already in the classifier's input space (virtual
    images): no augmentation (the reference trains on them as they are), no scaling."""

    def __call__(self, images: torch.Tensor, train: bool,  # pylint: disable=unused-argument
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return images
