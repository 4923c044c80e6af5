"""Mosaic: per-class experts, a meta model and data-free distillation (Liu et al. 2025).

Where each part lives:

- :mod:`.settings`: every hyper-parameter and the round schedule;
- :mod:`.prototypes`: per-class k-means feature centres;
- :mod:`.client`: what a client computes when the strategy asks (stats, generator);
- :mod:`.experts`: per-class experts as count-weighted averages, run as frozen
  channels-last modules;
- :mod:`.meta`: the attention meta model over expert logits, trained on prototypes;
- :mod:`.strategy`: :class:`~.strategy.MosaicStrategy`, the Flower strategy.

The client's image generator and its losses, the distillation losses and loop,
and the expert heads on features live in :mod:`mosaic_flwr.kd`, which the
baselines share.

Import the strategy from the package top (``from mosaic_flwr import
MosaicStrategy``); this ``__init__`` stays light because the run config reads
the defaults in :mod:`.settings`.
"""
