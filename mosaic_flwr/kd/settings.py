"""How a client trains its image generator: the settings Mosaic and FedDF share.

Torch-free on purpose: :class:`~mosaic_flwr.mosaic.settings.MosaicSettings` and
:class:`~mosaic_flwr.baselines.settings.FedDFSettings` extend this class (so
their keys are ``mosaic-generator-steps`` and ``feddf-generator-steps``), and
the run config imports them without loading torch. The ``task`` record a
strategy sends (its settings as ``{field: value}``) reads back with
``GeneratorSettings.from_mapping``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..method_settings import Settings


@dataclass(frozen=True)
class GeneratorSettings(Settings):  # pylint: disable=too-many-instance-attributes
    """A client generator's shape and training (reference: DCGAN, z = 100, ngf = 64 for
    3x32x32 images, Adam 2e-4, betas 0.5/0.999); see
    :func:`mosaic_flwr.kd.generator.train_generator`."""

    generator_steps: int = 200
    generator_batch_size: int = 64
    generator_lr: float = 2e-4
    generator_latent_dim: int = 100
    generator_width: int = 0  # 0: sized to the image (kd.generator.sized_width; 64 at 3x32x32)
    adversarial_weight: float = 1.0
    entropy_weight: float = 1.0
    diversity_weight: float = 1.0
    inversion_weight: float = 1.0
    inversion_max_samples: int = 1000  # clients with fewer samples add the BN inversion term

    @property
    def generator(self) -> GeneratorSettings:
        """These settings alone, from a method's settings that extend them (Mosaic's, FedDF's)."""
        return GeneratorSettings(**{f.name: getattr(self, f.name)
                                    for f in fields(GeneratorSettings)})
