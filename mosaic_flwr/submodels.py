"""Width sub-models of one architecture and their slice-wise aggregation.

HeteroFL and FedRolex give weaker clients a narrower copy of the global model
(:func:`mosaic_flwr.models.build_model` with ``width < 1``): every hidden layer
keeps ``sub`` of its ``full`` channels. HeteroFL keeps the first channels
(``static``); FedRolex keeps a window that moves one channel per round
(``rolling``), so that over the rounds every channel of the global model is
trained by small clients too.

A sub-model is described by :data:`Indices`: for every state entry and every
dimension, the indices of the global entries it holds (``None``: all of them).
The server cuts a sub-model out of the global state with
:func:`extract_submodel` and folds the clients' sub-models back in with
:func:`aggregate_submodels`, which averages every global entry over the
clients that hold it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

#: The ways a sub-model picks its channels: the first ones, or a rolling window.
SLICINGS = ("static", "rolling")

#: Per state entry, per dimension: the sorted global indices held, or ``None`` for all.
Indices = dict[str, tuple[torch.Tensor | None, ...]]


def channel_indices(full: int, sub: int, slicing: str, server_round: int) -> torch.Tensor:
    """The channels a sub-model holds of one dimension, as sorted int64 indices.

    Parameters
    ----------
    full, sub
        Size of the dimension in the global model and in the sub-model.
    slicing
        ``static``: channels ``0 .. sub-1`` (HeteroFL). ``rolling``: the window
        ``start, start+1, ..., start+sub-1`` taken modulo ``full``, with
        ``start = (server_round - 1) % full`` (FedRolex); round 1 equals
        ``static``.
    server_round
        The current round, counted from 1 (only used by ``rolling``).

    Returns
    -------
    torch.Tensor
        ``sub`` distinct indices in ``[0, full)``, ascending.
    """
    if slicing not in SLICINGS:
        raise ValueError(f"unknown slicing {slicing!r}; known: {', '.join(SLICINGS)}")
    if not 1 <= sub <= full:
        raise ValueError(f"a sub-model needs 1 <= sub <= full channels, got sub={sub}, full={full}")
    if slicing == "static":
        return torch.arange(sub, dtype=torch.long)
    start = (server_round - 1) % full
    return torch.sort((start + torch.arange(sub, dtype=torch.long)) % full).values


def submodel_indices(full_shapes: Mapping[str, Sequence[int]],
                     sub_shapes: Mapping[str, Sequence[int]],
                     slicing: str, server_round: int,
                     flatten_units: Mapping[str, int] | None = None) -> Indices:
    """Which global entries a sub-model holds, from the two models' state shapes.

    Every dimension whose size differs is sliced with :func:`channel_indices`.
    The indices depend only on the two sizes, the slicing and the round, so
    connected dimensions (a convolution's output channels, the BatchNorm after
    it, the next convolution's input channels, a ResNet shortcut added to the
    same channels) pick the same channels without knowing the architecture.

    Parameters
    ----------
    full_shapes, sub_shapes
        ``{entry name: shape}`` of the global model and of the sub-model
        (``{k: v.shape for k, v in model.state_dict().items()}``); same keys.
    slicing, server_round
        As in :func:`channel_indices`.
    flatten_units
        :attr:`mosaic_flwr.models.Classifier.flatten_units`: for a linear
        weight after a ``Flatten`` of (channels, u) maps, dimension 1 is
        channel-major blocks of ``u`` entries. Whole blocks are kept: the
        channels chosen among ``size // u`` are expanded to ``ch * u + arange(u)``.

    Returns
    -------
    Indices
        Per entry, per dimension: the held indices, or ``None`` where the
        sizes are equal.
    """
    flatten_units = dict(flatten_units or {})
    if set(full_shapes) != set(sub_shapes):
        only_full = sorted(set(full_shapes) - set(sub_shapes))
        only_sub = sorted(set(sub_shapes) - set(full_shapes))
        raise ValueError(f"state entries differ: only in the full model {only_full}, "
                         f"only in the sub-model {only_sub}")
    unknown = sorted(set(flatten_units) - set(full_shapes))
    if unknown:
        raise ValueError(f"flatten units given for entries the model does not have: {unknown}")

    indices: Indices = {}
    for name, full_shape in full_shapes.items():
        full_shape, sub_shape = tuple(full_shape), tuple(sub_shapes[name])
        if len(full_shape) != len(sub_shape):
            raise ValueError(f"{name}: full shape {full_shape} and sub shape {sub_shape} "
                             "have different numbers of dimensions")
        if any(s > f for f, s in zip(full_shape, sub_shape)):
            raise ValueError(f"{name}: sub shape {sub_shape} is larger than "
                             f"full shape {full_shape}")
        if name in flatten_units:
            _check_flatten(name, full_shape, sub_shape, flatten_units[name])
        per_dim: list[torch.Tensor | None] = []
        for dim, (full, sub) in enumerate(zip(full_shape, sub_shape)):
            if full == sub:
                per_dim.append(None)
            elif dim == 1 and name in flatten_units:
                per_dim.append(_block_indices(full, sub, flatten_units[name], slicing,
                                              server_round))
            else:
                per_dim.append(channel_indices(full, sub, slicing, server_round))
        indices[name] = tuple(per_dim)
    return indices


def _check_flatten(name: str, full_shape: tuple[int, ...], sub_shape: tuple[int, ...],
                   unit: int) -> None:
    """ValueError unless dimension 1 of both shapes is whole blocks of ``unit`` entries."""
    if len(full_shape) < 2:
        raise ValueError(f"{name}: a flatten unit needs a 2-D weight, got shape {full_shape}")
    if unit < 1 or full_shape[1] % unit or sub_shape[1] % unit:
        raise ValueError(f"{name}: flattened sizes {full_shape[1]} and {sub_shape[1]} are not "
                         f"multiples of the unit {unit}")


def _block_indices(full: int, sub: int, unit: int, slicing: str, server_round: int
                   ) -> torch.Tensor:
    """Indices of the flattened inputs of the channels kept, ``unit`` entries per channel."""
    channels = channel_indices(full // unit, sub // unit, slicing, server_round)
    return (channels[:, None] * unit + torch.arange(unit, dtype=torch.long)).reshape(-1)


def extract_submodel(full_state: Mapping[str, torch.Tensor], indices: Indices
                     ) -> dict[str, torch.Tensor]:
    """The sub-model's state: every global tensor sliced dimension by dimension.

    Parameters
    ----------
    full_state
        The global model's state.
    indices
        From :func:`submodel_indices`; one entry per state entry.

    Returns
    -------
    dict[str, torch.Tensor]
        Contiguous copies, ready for the sub-model's ``load_state_dict``;
        0-dim tensors (BatchNorm's ``num_batches_tracked``) are copied as they are.
    """
    sub_state: dict[str, torch.Tensor] = {}
    for name, tensor in full_state.items():
        sliced = tensor.detach()
        for dim, idx in enumerate(indices[name]):
            if idx is not None:
                sliced = sliced.index_select(dim, idx)
        sub_state[name] = sliced.clone(memory_format=torch.contiguous_format)
    return sub_state


def aggregate_submodels(global_state: Mapping[str, torch.Tensor],
                        client_states: Sequence[Mapping[str, torch.Tensor]],
                        client_indices: Sequence[Indices],
                        weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Slice-wise weighted average of sub-models (HeteroFL / FedRolex aggregation).

    Every entry of every global tensor becomes the weighted average of the
    clients whose slice holds it, the weights renormalised over those clients;
    entries no client holds keep their global value.

    Parameters
    ----------
    global_state
        The current global state; fixes the shapes and dtypes of the result.
    client_states
        Each client's trained sub-model state.
    client_indices
        Each client's :data:`Indices` into the global state.
    weights
        Positive client weights (typically example counts).

    Returns
    -------
    dict[str, torch.Tensor]
        The new global state. Sums run in float64 and are cast back to each
        global dtype; integer entries (``num_batches_tracked``) are rounded.
    """
    if not len(client_states) == len(client_indices) == len(weights):
        raise ValueError(f"{len(client_states)} client states, {len(client_indices)} index sets "
                         f"and {len(weights)} weights: the lengths must match")
    if any(not w > 0 for w in weights):
        raise ValueError(f"client weights must be positive, got {list(weights)}")

    aggregated: dict[str, torch.Tensor] = {}
    for name, current in global_state.items():
        numerator = torch.zeros(current.shape, dtype=torch.float64)
        weight_sum = torch.zeros(current.shape, dtype=torch.float64)
        for client, (state, indices, weight) in enumerate(zip(client_states, client_indices,
                                                             weights)):
            if name not in state or name not in indices:
                raise ValueError(f"client {client} has no state or indices for {name}")
            positions = _flat_positions(name, current.shape, indices[name])
            values = state[name].detach().to(torch.float64)
            if values.shape != positions.shape:
                raise ValueError(f"{name}: client {client} sent shape {tuple(values.shape)}, "
                                 f"its indices select {tuple(positions.shape)}")
            flat = positions.reshape(-1)
            numerator.view(-1).index_add_(0, flat, weight * values.reshape(-1))
            weight_sum.view(-1).index_add_(0, flat, torch.full_like(flat, weight,
                                                                    dtype=torch.float64))
        average = numerator / weight_sum.clamp_min(torch.finfo(torch.float64).tiny)
        if not current.is_floating_point():
            average = average.round()
        merged = torch.where(weight_sum > 0, average, current.detach().to(torch.float64))
        aggregated[name] = merged.to(current.dtype)
    return aggregated


def _flat_positions(name: str, shape: torch.Size, index: tuple[torch.Tensor | None, ...]
                    ) -> torch.Tensor:
    """Row-major positions in a tensor of ``shape`` of the entries ``index`` selects.

    The result has the sliced tensor's shape (a 0-dim tensor for a 0-dim entry).
    """
    if len(index) != len(shape):
        raise ValueError(f"{name}: indices for {len(index)} dimensions, "
                         f"the global entry has {len(shape)}")
    positions = torch.zeros((), dtype=torch.long)
    for size, idx in zip(shape, index):
        axis = torch.arange(size, dtype=torch.long) if idx is None else idx.to(torch.long)
        positions = positions.unsqueeze(-1) * size + axis
    return positions
