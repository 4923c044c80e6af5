"""Knowledge-distillation parts that several methods share.

Where each part lives:

- :mod:`.settings`: :class:`~.settings.GeneratorSettings`, how a client trains
  its image generator (torch-free, so method settings can build it);
- :mod:`.generator`: the image generator (unconditional for Mosaic's and
  FedDF's clients, label-conditioned for FedFTG's and DENSE's servers), its
  discriminator, the generator losses and the client's training loop;
- :mod:`.upload`: a client's generator, trained on its data for the reply;
- :mod:`.distill`: the distillation losses (KL + CE + JSD) and the student's
  training loop (Mosaic, FedDF; DENSE uses the loss);
- :mod:`.ensemble`: client ensembles (logits, averages, class-wise mixtures),
  expert heads on feature vectors, label sampling by counts, and the soft
  cross-entropy and pairwise diversity losses.
"""
