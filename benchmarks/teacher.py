"""Benchmark: the Mosaic teacher's forward pass and the server's distillation phase.

In one process, on the same ten experts of one architecture (random weights:
only speed is measured), prints the median time of the experts' forward on one
distillation batch (``--batch`` inputs) for

- ``vmap``: ``torch.func.functional_call`` under ``torch.func.vmap`` over the
  stacked expert state (this project's teacher before the speed work);
- ``plain loop``: one default-layout module per expert, called in turn (the
  straightforward reference);
- ``grouped conv``: the ten CNNs fused into one with grouped convolutions and
  batched matrix products (CNN only);
- ``fast loop``: what the teacher runs now, frozen channels-last modules
  (:func:`mosaic_flwr.mosaic.experts.expert_modules`), in float32 and under
  CPU bfloat16 autocast;

then the whole distillation phase (``--steps`` student steps): the former path
(vmapped teacher, fresh generator samples every step, float32), timed over
``--old-steps`` steps and scaled to ``--steps``, against the current one
(:func:`mosaic_flwr.kd.distill.distill_into` with a teacher pool and CPU
bfloat16), timed whole. Example::

    python benchmarks/teacher.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.func import functional_call, vmap
from torch.nn import functional as F

from mosaic_flwr.data.datasets import DATASETS
from mosaic_flwr.kd.distill import DistillWeights, distill_into, distillation_loss
from mosaic_flwr.kd.ensemble import client_logits
from mosaic_flwr.kd.generator import ImageGenerator
from mosaic_flwr.kd.settings import GeneratorSettings
from mosaic_flwr.models import build_model
from mosaic_flwr.mosaic.experts import class_experts, expert_modules, expert_weights
from mosaic_flwr.training import autocast, cpu_bf16_supported


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def grouped_cnn(experts: dict, num_experts: int):
    """The experts of :func:`mosaic_flwr.models.cnn` as one network (grouped convolutions)."""
    cat = {k: torch.cat(list(v)) for k, v in experts.items() if k.startswith("body.") and v.dim() > 1}
    bias = {k: torch.cat(list(v)) for k, v in experts.items() if k.endswith("bias")}

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(F.conv2d(x, cat["body.0.weight"], bias["body.0.bias"], padding=2)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, cat["body.3.weight"], bias["body.3.bias"], padding=2,
                                         groups=num_experts)), 2)
        h = h.reshape(len(x), num_experts, -1).transpose(0, 1)
        h = F.relu(torch.baddbmm(experts["body.7.bias"][:, None], h,
                                 experts["body.7.weight"].transpose(1, 2)))
        return torch.baddbmm(experts["head.bias"][:, None], h, experts["head.weight"].transpose(1, 2))
    return forward


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--batch", type=int, default=320, help="inputs per distillation step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--old-steps", type=int, default=10)
    parser.add_argument("--pool-batches", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = DATASETS[args.dataset]
    cpu = torch.device("cpu")
    make = lambda: build_model(args.model, spec)  # noqa: E731
    clients = [make() for _ in range(args.experts)]
    counts = torch.randint(0, 100, (args.experts, spec.num_classes))
    experts = class_experts([c.state_dict() for c in clients], expert_weights(counts))
    x = torch.randn(args.batch, *spec.input_shape)
    template = make().eval()
    plain = []
    for e in range(spec.num_classes):
        module = make()
        module.load_state_dict({k: v[e] for k, v in experts.items()})
        plain.append(module.eval())
    fast = expert_modules(make, experts)

    def vmap_teacher(inputs: torch.Tensor) -> torch.Tensor:
        return vmap(lambda state, batch: functional_call(template, state, (batch,)),
                    in_dims=(0, None))(dict(experts), inputs)

    def vmapped() -> torch.Tensor:
        return vmap_teacher(x)

    def fast_bf16() -> torch.Tensor:
        with autocast(cpu, cpu_bf16=True):
            return client_logits(fast, x)

    rows = []
    with torch.no_grad():
        reference = client_logits(plain, x)
        rows.append(("vmap (before)", median_ms(vmapped, args.repeats), vmapped()))
        rows.append(("plain loop", median_ms(lambda: client_logits(plain, x), args.repeats), reference))
        if args.model == "cnn":
            grouped = grouped_cnn(experts, spec.num_classes)
            rows.append(("grouped conv", median_ms(lambda: grouped(x), args.repeats), grouped(x)))
        rows.append(("fast loop fp32 (now)", median_ms(lambda: client_logits(fast, x), args.repeats),
                     client_logits(fast, x)))
        rows.append(("fast loop bf16 (now, cpu-bf16)", median_ms(fast_bf16, args.repeats),
                     fast_bf16()))
    loop_ms = rows[1][1]
    print(f"{args.experts} experts ({args.model}, {args.dataset}), batch {args.batch}, "
          f"{args.threads} threads; CPU bfloat16 native: {cpu_bf16_supported()}")
    print("| teacher forward | ms | x plain loop's speed | max abs diff to the plain loop | "
          "argmax agreement |\n|---|---|---|---|---|")
    for name, ms, out in rows:
        diff = float((out.float() - reference).abs().max())
        agree = float((out.float().argmax(-1) == reference.argmax(-1)).float().mean())
        print(f"| {name} | {ms:.0f} | {loop_ms / ms:.2f} | {diff:.1e} | {agree:.4f} |")

    # The distillation phase: former path (timed on a few steps, scaled) vs current path.
    generators = [ImageGenerator(spec, 100, GeneratorSettings().generator_width).eval()
                  for _ in range(args.experts)]
    per_generator = args.batch // args.experts
    rng = torch.Generator().manual_seed(0)

    def sample() -> torch.Tensor:
        return torch.cat([g.sample(per_generator, rng) for g in generators])

    weights = DistillWeights()
    student = make().eval()
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-3)
    start = time.perf_counter()
    for _ in range(args.old_steps):
        with torch.no_grad():
            inputs = sample()
            target = vmap_teacher(inputs).mean(0)
        loss, _ = distillation_loss(student(inputs), target, weights)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    old = (time.perf_counter() - start) / args.old_steps * args.steps
    for generator in generators:
        generator.to(memory_format=torch.channels_last).requires_grad_(False)
    start = time.perf_counter()
    distill_into(make(), lambda inputs: client_logits(fast, inputs).mean(0), sample,
                 steps=args.steps, lr=1e-3, weights=weights, device=cpu, cpu_bf16=True,
                 pool_batches=args.pool_batches, rng=rng)
    new = time.perf_counter() - start
    print(f"\n| distillation phase, {args.steps} steps of {args.batch} inputs | s |\n|---|---|")
    print(f"| before: vmap teacher, fresh samples, float32 ({args.old_steps} steps timed, "
          f"scaled) | {old:.1f} |")
    print(f"| now: fast loop, pool of {args.pool_batches} batches, cpu-bf16 | {new:.1f} |")
    print(f"| ratio | {old / new:.1f}x |")


if __name__ == "__main__":
    main()
