"""FedCOG (Ye et al., ICLR 2024): clients synthesise complementary data; the server is FedAvg.

From round ``start_round`` on, each client, before local training,

1. counts how far each class falls short of its largest class
   (``d_c = max_j n_j - n_c``) and targets ``num_samples * d_c / sum d`` samples
   at class c: the classes it lacks;
2. optimises input tensors directly (Adam, from Gaussian noise) so that the
   received global model predicts the targeted class (cross-entropy) while the
   client's previous local model disagrees with it
   (``1 - JS(global, local)``, probabilities clipped to [0.01, 0.99]); the
   lowest-loss inputs are kept with the global model's logits on them;
3. trains with ``w_real * CE(real batch) + w_syn * KL_T(batch of those inputs)``
   towards the stored global logits, ``w_syn = N_syn / (N_real + N_syn)`` with
   the notional ``N_syn = sum_c d_c`` (``w_real = 1 - w_syn``), as in the
   reference. The regulariser returns ``w_syn * (KL_T - CE)``, which turns the
   training loop's plain cross-entropy into that mix.

The client keeps its trained model in the node's state for the next round's
disagreement term; before it has one it uses the global model, so the term is
0 and only the cross-entropy shapes the inputs.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.nn import functional as F

from ..client_part import ClientPart, ClientWork
from ..config import RunConfig
from ..kd.ensemble import keep_best
from ..models import Classifier
from ..records import TrainTask
from ..task_strategy import ScoreFn, TaskStrategy, model_fn_for, server_options
from ..training import FrozenForward, Regulariser, fast_layout
from .settings import FedCOGSettings

#: The node-state record that keeps a client's last trained model (it never leaves the node).
LOCAL_MODEL_RECORD = "local-model"


def complementary_counts(label_counts: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Samples to synthesise per class: ``num_samples * d_c / sum d``, ``d_c = max - n_c``."""
    deficit = (label_counts.max() - label_counts).double()
    if deficit.sum() == 0:
        return torch.zeros_like(label_counts)
    return torch.floor(num_samples * deficit / deficit.sum()).long()


def js_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence of two predictions, probabilities clipped to
    [0.01, 0.99] as in the reference (``1 - JS`` is FedCOG's disagreement loss)."""
    p = F.softmax(logits_a.float(), dim=1).clamp(0.01, 0.99)
    q = F.softmax(logits_b.float(), dim=1).clamp(0.01, 0.99)
    m = (p + q) / 2
    return 0.5 * ((m * (m.log() - p.log())).sum(1) + (m * (m.log() - q.log())).sum(1))


def synthesize_complementary(global_model: nn.Module, local_model: nn.Module,
                             per_class: torch.Tensor, input_shape: tuple[int, ...],
                             settings: FedCOGSettings, device: torch.device,
                             rng: torch.Generator, amp: bool = True, cpu_bf16: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs for the targeted classes: (inputs, their labels, the global model's logits).

    The two frozen models run under ``amp`` (CUDA) or ``cpu_bf16``
    (:class:`~mosaic_flwr.training.FrozenForward`); the inputs are optimised in float32."""
    labels = torch.repeat_interleave(torch.arange(len(per_class)), per_class.cpu()).to(device)
    x = torch.randn(len(labels), *input_shape, generator=rng).to(device).requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=settings.generation_lr, betas=(0.5, 0.9))
    global_model.eval().requires_grad_(False)
    local_model.eval().requires_grad_(False)
    frozen_global = FrozenForward(global_model, device, amp, cpu_bf16)
    frozen_local = FrozenForward(local_model, device, amp, cpu_bf16)
    best, best_loss = x.detach().clone(), None
    for _ in range(settings.generation_steps):
        g_logits = frozen_global(x)
        ce = F.cross_entropy(g_logits, labels)
        disagreement = 1 - js_agreement(g_logits, frozen_local(x)).mean().clamp(0, 1)
        loss = settings.ce_weight * ce + settings.disagreement_weight * disagreement
        best, best_loss = keep_best(best, best_loss, x, loss)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    global_model.requires_grad_(True)
    with torch.no_grad():
        targets = global_model(best).float()
    return best, labels, targets


class FedCOGStrategy(TaskStrategy):
    """FedCOG: FedAvg on the server; clients add complementary synthetic data from
    ``start_round`` on (and keep their model between rounds for that)."""

    def __init__(self, model_fn: Callable[[], Classifier], settings: FedCOGSettings | None = None,
                 **kwargs) -> None:
        super().__init__(model_fn, **kwargs)
        self.settings = settings or FedCOGSettings()
        self.settings.check()

    @classmethod
    def from_config(cls, config: RunConfig, score_fn: ScoreFn | None = None,
                    **kwargs) -> "FedCOGStrategy":
        """The strategy for a run config."""
        return cls(model_fn_for(config), config.fedcog,
                   **server_options(config, score_fn), **kwargs)

    def task_for(self, server_round: int) -> TrainTask:
        """The FedCOG objective every round (it is plain training before ``start_round``)."""
        phase = "complement" if server_round >= self.settings.start_round else "train"
        return TrainTask(phase=phase, objective="fedcog", keep_model=True,
                         settings=self.settings.to_mapping())


class FedCOGObjective(ClientPart):
    """FedCOG's part of local training: distillation from the global model on complementary data
    synthesised against this client's previous local model; the trained model is then kept."""

    def before_training(self, work: ClientWork) -> Regulariser | None:
        """Synthesise this client's complementary data; the distillation term on it, or None
        before ``start_round`` or when the client holds every class equally."""
        setup, task, rng, metrics = work.setup, work.task, work.rng, work.metrics
        settings = FedCOGSettings.from_mapping(task.settings)
        if setup.server_round < settings.start_round:
            return None
        counts = torch.bincount(setup.labels, minlength=setup.spec.num_classes)
        per_class = complementary_counts(counts, settings.num_samples)
        if int(per_class.sum()) == 0:
            return None
        start = time.monotonic()
        model: Classifier = setup.model
        local = setup.global_spec.build(setup.spec)
        # The previous local model lives in the node's state: a new node, or any node after
        # a restart of the simulation, has none and uses the received model (as in round 1).
        previous = setup.context.state.array_records.get(LOCAL_MODEL_RECORD)
        local.load_state_dict(previous.to_torch_state_dict() if previous is not None
                              else model.state_dict())
        metrics["fedcog-previous-model"] = float(previous is not None)
        x_syn, _, targets = synthesize_complementary(
            fast_layout(model.to(setup.device)), fast_layout(local.to(setup.device)), per_class,
            (setup.spec.channels, setup.spec.image_size, setup.spec.image_size), settings,
            setup.device, rng, setup.config.amp, setup.config.cpu_bf16)
        metrics["fedcog-seconds"] = time.monotonic() - start
        metrics["fedcog-samples"] = len(x_syn)
        notional = float((counts.max() - counts).sum())
        w_syn = notional / (notional + len(setup.labels))
        metrics["fedcog-synthetic-weight"] = w_syn
        temp = settings.temperature

        def regulariser(model: nn.Module, x: torch.Tensor, y: torch.Tensor,  # pylint: disable=unused-argument
                        logits: torch.Tensor) -> torch.Tensor:
            idx = torch.randint(0, len(x_syn), (len(y),), generator=rng).to(x_syn.device)
            student = F.log_softmax(model(x_syn[idx]).float() / temp, dim=1)
            teacher = F.log_softmax(targets[idx] / temp, dim=1)
            kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temp * temp
            return w_syn * (kl - F.cross_entropy(logits.float(), y))

        return regulariser

    def after_training(self, work: ClientWork) -> None:
        """Keep the trained model in the node's state for the next round; it never leaves."""
        if not work.task.keep_model:
            return
        work.context.state[LOCAL_MODEL_RECORD] = ArrayRecord(
            {k: v.detach().cpu()  # host read: the model's state, once per round
             for k, v in work.setup.model.state_dict().items()})
