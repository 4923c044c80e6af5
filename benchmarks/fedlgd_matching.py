"""Benchmark: how good FedLGD's local virtual images are after distribution matching.

One client holding an IID share of the training split (``--client-size``
images, seed 0) builds its local virtual set as FedLGD's client does in its
first round (``fedlgd-images-per-class`` images per class from the class's
pixel statistics, then ``steps`` distribution-matching steps, each under a
freshly initialised network of the run's model). A new model is then trained
on the virtual images alone (``--epochs`` epochs, the run's optimiser) and
scored on the test split: the accuracy that virtual set can teach, beside what
the client's real images teach the same way. Printed for every (image learning
rate, steps) pair asked for, with the matching time (``--threads``, bfloat16
forward passes where the CPU computes them). Example::

    python benchmarks/prepare_mnist.py --out data/mnist-12k --train-size 12000 --test-size 2000
    python benchmarks/fedlgd_matching.py --data-path data/mnist-12k \\
        --settings 1:200 1:1000 10:200 30:200 100:200
"""

from __future__ import annotations

import argparse
import time

import torch

from mosaic_flwr.baselines.fedlgd import (NormalisedInputs, class_gaussian_images,
                                          distribution_matching, fresh_networks)
from mosaic_flwr.baselines.settings import FedLGDSettings
from mosaic_flwr.config import RunConfig
from mosaic_flwr.data import dataset_spec, load_data
from mosaic_flwr.data.augment import BatchTransform
from mosaic_flwr.models import ModelSpec
from mosaic_flwr.training import TrainSettings, evaluate, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-path", default="")
    parser.add_argument("--client-size", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=["1:200", "10:200"],
                        help="image learning rate:steps pairs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RunConfig.from_mapping({"dataset": args.dataset, "data-path": args.data_path})
    spec, data, cpu = dataset_spec(config), load_data(config), torch.device("cpu")
    transform = BatchTransform(spec)
    pick = torch.randperm(len(data.train_labels), generator=torch.Generator().manual_seed(0))
    idx = pick[:args.client_size].numpy()
    images = transform.normalise(torch.from_numpy(data.train_images[idx]))
    labels = torch.from_numpy(data.train_labels[idx]).long()
    test_images = torch.from_numpy(data.test_images)
    test_labels = torch.from_numpy(data.test_labels).long()
    model = ModelSpec.parse(config.model)
    train_settings = TrainSettings(epochs=args.epochs, batch_size=config.batch_size,
                                   learning_rate=config.learning_rate, momentum=config.momentum)

    def teaches(x: torch.Tensor, y: torch.Tensor) -> float:
        """Test accuracy of a new model trained on (x, y) alone (already normalised)."""
        student = model.build(spec, seed=0)
        train(student, x, y, NormalisedInputs(), train_settings, cpu,
              torch.Generator().manual_seed(0))
        return evaluate(student, test_images, test_labels, transform, cpu)[1]

    print(f"{args.dataset}: one IID client of {len(labels)} images; a {config.model} trained "
          f"{args.epochs} epochs on its virtual images, scored on {len(test_labels)} test images")
    print(f"reference: its {len(labels)} real images (no augmentation) teach "
          f"{teaches(images, labels):.4f}", flush=True)
    for pair in args.settings:
        lr, steps = float(pair.split(":")[0]), int(pair.split(":")[1])
        settings = FedLGDSettings(image_lr=lr)
        rng = torch.Generator().manual_seed(0)
        counts = torch.bincount(labels, minlength=spec.num_classes).clamp_max(
            settings.images_per_class)
        virtual, virtual_labels = class_gaussian_images(images, labels, counts, rng)
        start = time.perf_counter()
        if steps:
            virtual, _, _ = distribution_matching(
                virtual, virtual_labels, images, labels,
                fresh_networks(lambda seed: model.build(spec, seed=seed), steps, cpu, rng),
                steps, settings, spec, rng, cpu_bf16=True)
        seconds = time.perf_counter() - start
        print(f"image lr {lr:g}, {steps} steps: matching {seconds:.0f} s "
              f"({1000 * seconds / max(steps, 1):.0f} ms/step); {len(virtual_labels)} virtual "
              f"images teach {teaches(virtual, virtual_labels):.4f}", flush=True)


if __name__ == "__main__":
    main()
