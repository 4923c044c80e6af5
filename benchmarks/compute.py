"""Benchmark: how much computation Mosaic adds to FedAvg, counted in FLOPs.

Wall time on a shared machine moves with the load; floating-point operations do
not. This counts (``torch.utils.flop_counter``) what each phase of a Mosaic run
costs beyond the FedAvg run it contains, for the benchmark's setting
(``docs/results/speed.md``: MNIST CNN, 12,000 training images, 10 clients,
5 rounds x 5 local epochs) and the current defaults, and prints each phase as a
share of FedAvg's whole training:

- local training: forward and backward of the CNN on every sample of every epoch;
- client generators: per step the generator, the discriminator's step on a
  real and a generated batch, and the frozen classifier's forward and backward
  to the generated batch (what ``kd.generator.train_generator`` runs);
- the teacher: every expert on every pooled input, once;
- distillation: the student's forward and backward on each step's inputs.

Example::

    python benchmarks/compute.py
    python benchmarks/compute.py --generator-steps 100 --distill-steps 150
"""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from mosaic_flwr.data.datasets import DATASETS
from mosaic_flwr.kd.generator import Discriminator, ImageGenerator
from mosaic_flwr.models import build_model
from mosaic_flwr.mosaic.settings import MosaicSettings


def flops(fn) -> int:
    """Floating-point operations of one call of ``fn``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    """Count and print."""
    defaults = MosaicSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--train-size", type=int, default=12000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--generator-steps", type=int, default=defaults.generator_steps)
    parser.add_argument("--generator-batch-size", type=int, default=defaults.generator_batch_size)
    parser.add_argument("--distill-steps", type=int, default=defaults.distill_steps)
    parser.add_argument("--pool-batches", type=int, default=defaults.distill_pool_batches)
    parser.add_argument("--samples-per-generator", type=int,
                        default=defaults.samples_per_generator)
    args = parser.parse_args(argv)

    spec = DATASETS[args.dataset]
    shape = (spec.channels, spec.image_size, spec.image_size)
    model = build_model(args.model, spec)
    frozen = build_model(args.model, spec).requires_grad_(False)
    x, y = torch.randn(64, *shape), torch.randint(0, spec.num_classes, (64,))
    per_sample = flops(lambda: F.cross_entropy(model(x), y).backward()) / 64
    fedavg = per_sample * args.train_size * args.local_epochs * args.rounds

    generator = ImageGenerator(spec, defaults.generator_latent_dim, defaults.generator_width)
    discriminator = Discriminator(spec.channels, spec.image_size, generator.width)
    batch = args.generator_batch_size

    def generator_step() -> None:
        fake = generator(torch.randn(batch, generator.latent_dim))
        real = torch.randn(batch, *shape)
        (F.softplus(-discriminator(real)).mean()
         + F.softplus(discriminator(fake.detach())).mean()).backward()
        (frozen(fake).logsumexp(1).mean() + discriminator(fake).mean()).backward()

    per_step = flops(generator_step)
    inputs = torch.randn(args.samples_per_generator * args.clients, *shape)
    with torch.no_grad():
        teacher_batch = flops(lambda: [frozen(inputs) for _ in range(args.clients)])
    student_step = flops(lambda: model(inputs).logsumexp(1).mean().backward())
    pool = args.pool_batches or args.distill_steps
    phases = {
        "client generators": args.clients * args.generator_steps * per_step,
        "teacher (experts on the pool)": pool * teacher_batch,
        "distillation (student steps)": args.distill_steps * student_step,
    }
    print(f"{args.dataset} {args.model}: {per_sample / 1e6:.1f} MFLOP per training sample "
          f"(forward + backward); FedAvg's training {fedavg / 1e12:.2f} TFLOP")
    print(f"generator step ({batch} samples): {per_step / 1e9:.2f} GFLOP = "
          f"{per_step / (per_sample * 64):.2f} training steps of 64")
    print("| phase | GFLOP | x FedAvg's training |\n|---|---|---|")
    for name, value in phases.items():
        print(f"| {name} | {value / 1e9:.1f} | {value / fedavg:.3f} |")
    extra = sum(phases.values())
    print(f"| Mosaic's additions | {extra / 1e9:.1f} | {extra / fedavg:.3f} |")


if __name__ == "__main__":
    main()
