"""The methods Mosaic is compared with, each a Flower strategy plus its client-side part.

Where each method lives (settings for all of them in :mod:`.settings`):

- :mod:`.fedgen`: FedGen (Zhu et al. 2021): a server-side feature-space
  generator that regularises local training;
- :mod:`.fedftg`: FedFTG (Zhang et al. 2022): server-side fine-tuning of the
  global model on a label-conditioned generator's hard samples;
- :mod:`.dense`: DENSE (Zhang et al. 2022): one-shot, a server generator
  alternating with ensemble distillation;
- :mod:`.feddf`: FedDF (Lin et al. 2020): ensemble distillation on unlabelled
  inputs (a proxy split or client generators);
- :mod:`.fedcog`: FedCOG (Ye et al. 2024): clients synthesise complementary data
  against the global model; the server is FedAvg;
- :mod:`.fedlgd`: FedLGD (Huang et al. 2024): clients train on distilled virtual
  data, anchored by a global virtual set the server updates by gradient matching;
- :mod:`.spectral`: Spectral Co-Distillation (Chen et al. 2023): personalised
  models co-distilled with the generic one through their weight spectra (and,
  with its terms off, FedAvg-FT);
- :mod:`.ditto`: Ditto (Li et al. 2021): personalised models tied to the global
  one by a proximal term (both personalised methods share :mod:`.personalised`);
- :mod:`.heterofl`: HeteroFL (Diao et al. 2021) and FedRolex (Alam et al. 2022):
  width sub-models of the global model, static or rolling slices.

What several of them share with Mosaic (generators, distillation, ensembles,
the diversity loss) lives in :mod:`mosaic_flwr.kd`.

Import the strategies from their modules or the package top (``from mosaic_flwr
import FedGenStrategy``); this ``__init__`` stays light because the run config
reads the defaults in :mod:`.settings`.
"""
