"""Width sub-models: channel choice, slicing of real models, slice-wise aggregation."""

import pytest
import torch

from mosaic_flwr.data.datasets import DATASETS
from mosaic_flwr.models import build_model
from mosaic_flwr.submodels import (
    aggregate_submodels,
    channel_indices,
    extract_submodel,
    submodel_indices,
)

SPEC = DATASETS["digits"]


def _shapes(state):
    return {name: tuple(t.shape) for name, t in state.items()}


def _covered(shape, index):
    """Boolean mask of the entries ``index`` selects, built with meshgrid indexing."""
    mask = torch.zeros(shape, dtype=torch.bool)
    if not shape:
        return torch.ones((), dtype=torch.bool)
    axes = [torch.arange(n) if idx is None else idx for n, idx in zip(shape, index)]
    mask[torch.meshgrid(*axes, indexing="ij")] = True
    return mask


# -- channel_indices ------------------------------------------------------------------------

@pytest.mark.parametrize("slicing, server_round, expected", [
    ("static", 1, [0, 1, 2]),
    ("static", 4, [0, 1, 2]),
    ("rolling", 1, [0, 1, 2]),
    ("rolling", 2, [1, 2, 3]),
    ("rolling", 3, [2, 3, 4]),
    ("rolling", 4, [0, 3, 4]),   # start 3: 3, 4, 0
    ("rolling", 5, [0, 1, 4]),   # start 4: 4, 0, 1
    ("rolling", 6, [0, 1, 2]),   # start wraps to 0
])
def test_channel_indices_by_hand(slicing, server_round, expected):
    got = channel_indices(5, 3, slicing, server_round)
    assert got.dtype == torch.int64
    assert got.tolist() == expected


def test_channel_indices_full_width_is_everything():
    assert channel_indices(4, 4, "rolling", 3).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("full, sub, slicing", [
    (5, 3, "random"), (5, 6, "static"), (5, 0, "rolling"),
])
def test_channel_indices_errors(full, sub, slicing):
    with pytest.raises(ValueError):
        channel_indices(full, sub, slicing, 1)


@pytest.mark.parametrize("full, sub", [(5, 3), (8, 2), (16, 4), (7, 1), (6, 6)])
def test_rolling_covers_every_channel_static_does_not(full, sub):
    rounds = range(1, full - sub + 2)
    rolling = set().union(*(channel_indices(full, sub, "rolling", r).tolist() for r in rounds))
    static = set().union(*(channel_indices(full, sub, "static", r).tolist() for r in rounds))
    assert rolling == set(range(full))
    assert static == set(range(sub))


# -- submodel_indices -----------------------------------------------------------------------

def test_submodel_indices_with_a_flatten_unit():
    full = {"fc.weight": (6, 8), "fc.bias": (6,), "head.weight": (10, 6)}
    sub = {"fc.weight": (3, 4), "fc.bias": (3,), "head.weight": (10, 3)}
    idx = submodel_indices(full, sub, "rolling", 4, flatten_units={"fc.weight": 2})
    # Rows: 3 of 6 from start 3. Columns: 2 of 4 channels from start 3 -> channels {3, 0}.
    assert idx["fc.weight"][0].tolist() == [3, 4, 5]
    assert idx["fc.weight"][1].tolist() == [0, 1, 6, 7]
    assert idx["fc.bias"][0].tolist() == [3, 4, 5]
    assert idx["head.weight"][0] is None
    assert idx["head.weight"][1].tolist() == [3, 4, 5]

    static = submodel_indices(full, sub, "static", 4, flatten_units={"fc.weight": 2})
    assert static["fc.weight"][1].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("full, sub, units, match", [
    ({"a": (4,), "b": (2,)}, {"a": (2,)}, None, "b"),
    ({"a": (4, 4)}, {"a": (2,)}, None, "a"),
    ({"a": (4, 4)}, {"a": (2, 5)}, None, "a"),
    ({"fc": (4, 6)}, {"fc": (2, 3)}, {"fc": 2}, "fc"),
    ({"fc": (4, 6)}, {"fc": (2, 4)}, {"fc": 4}, "fc"),
])
def test_submodel_indices_errors_name_the_entry(full, sub, units, match):
    with pytest.raises(ValueError, match=match):
        submodel_indices(full, sub, "static", 1, flatten_units=units)


# -- aggregate_submodels on hand tensors ------------------------------------------------------

def test_aggregate_1d_slices():
    glob = {"w": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([5.0, 6.0, 7.0])}
    out = aggregate_submodels(
        glob, [a, b],
        [{"w": (torch.tensor([0, 1]),)}, {"w": (torch.tensor([0, 1, 2]),)}],
        [1.0, 3.0])
    expected = torch.tensor([(1 * 1 + 3 * 5) / 4, (1 * 2 + 3 * 6) / 4, 7.0, 40.0])
    assert out["w"].dtype == torch.float32
    assert torch.allclose(out["w"], expected)


def test_aggregate_2d_slices_and_integers():
    glob = {"w": torch.zeros(3, 3), "n": torch.tensor(100), "c": torch.tensor([9, 9, 9])}
    a = {"w": torch.ones(2, 1), "n": torch.tensor(1), "c": torch.tensor([2, 3])}
    b = {"w": torch.full((1, 2), 4.0), "n": torch.tensor(2), "c": torch.tensor([4])}
    a_idx = {"w": (torch.tensor([0, 2]), torch.tensor([1])), "n": (), "c": (torch.tensor([0, 1]),)}
    b_idx = {"w": (torch.tensor([2]), torch.tensor([1, 2])), "n": (), "c": (torch.tensor([1]),)}
    out = aggregate_submodels(glob, [a, b], [a_idx, b_idx], [1.0, 1.0])
    expected = torch.tensor([[0.0, 1.0, 0.0],
                             [0.0, 0.0, 0.0],
                             [0.0, 2.5, 4.0]])
    assert torch.equal(out["w"], expected)
    # Integers: (1 + 2) / 2 = 1.5 rounds half to even -> 2; (3 + 4) / 2 = 3.5 -> 4.
    assert out["n"].dtype == torch.int64 and out["n"].item() == 2
    assert out["c"].tolist() == [2, 4, 9]


def test_aggregate_errors():
    glob = {"w": torch.zeros(4)}
    idx = {"w": (torch.tensor([0, 1]),)}
    client = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="lengths"):
        aggregate_submodels(glob, [client], [idx, idx], [1.0])
    with pytest.raises(ValueError, match="positive"):
        aggregate_submodels(glob, [client], [idx], [0.0])
    with pytest.raises(ValueError, match="w"):
        aggregate_submodels(glob, [{"w": torch.zeros(3)}], [idx], [1.0])


# -- real models -------------------------------------------------------------------------------

def _full_and_indices(name, width, slicing, server_round):
    torch.manual_seed(0)
    full = build_model(name, SPEC, 1.0)
    sub = build_model(name, SPEC, width)
    idx = submodel_indices(_shapes(full.state_dict()), _shapes(sub.state_dict()),
                           slicing, server_round, full.flatten_units)
    return full, sub, idx


@pytest.mark.parametrize("slicing", ["static", "rolling"])
@pytest.mark.parametrize("width", [0.5, 0.25])
@pytest.mark.parametrize("name", ["cnn", "resnet8"])
def test_sliced_model_computes_the_covered_part_of_the_full_model(name, width, slicing):
    """Zero what the sub-model drops: outputs agree only if every connected dim matches."""
    full, sub, idx = _full_and_indices(name, width, slicing, server_round=3)
    state = full.state_dict()
    masked = {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            masked[key] = tensor
            continue
        fill = 1.0 if key.endswith("running_var") else 0.0
        masked[key] = torch.where(_covered(tuple(tensor.shape), idx[key]), tensor,
                                  torch.full_like(tensor, fill))
    full.load_state_dict(masked)
    sub.load_state_dict(extract_submodel(state, idx), strict=True)
    full.eval()
    sub.eval()

    x = torch.randn(4, *SPEC.input_shape)
    with torch.no_grad():
        logits_full, logits_sub = full(x), sub(x)
        features_full, features_sub = full.features(x), sub.features(x)
    assert torch.allclose(logits_full, logits_sub, atol=1e-5)
    head_in = idx["head.weight"][1]
    assert torch.allclose(features_full[:, head_in], features_sub, atol=1e-5)
    # The dropped features are exactly zero, and the sub-model is not trivially zero.
    dropped = torch.ones(full.feature_dim, dtype=torch.bool)
    dropped[head_in] = False
    assert torch.count_nonzero(features_full[:, dropped]) == 0
    assert features_sub.abs().sum() > 0


def test_rolling_windows_differ_across_rounds_on_a_real_model():
    _, _, round1 = _full_and_indices("cnn", 0.5, "rolling", 1)
    _, _, round3 = _full_and_indices("cnn", 0.5, "rolling", 3)
    assert round1["body.0.weight"][0].tolist() == list(range(16))
    assert round3["body.0.weight"][0].tolist() == list(range(2, 18))
    # The flattened input of body.7 keeps whole 4-entry blocks of channels 2..33.
    assert round3["body.7.weight"][1].tolist() == list(range(8, 136))


def test_full_client_round_trip():
    full, _, _ = _full_and_indices("resnet8", 1.0, "static", 1)
    glob = {k: torch.zeros_like(v) for k, v in full.state_dict().items()}
    client = full.state_dict()
    all_idx = {k: (None,) * v.dim() for k, v in client.items()}
    out = aggregate_submodels(glob, [client], [all_idx], [1.0])
    assert out.keys() == client.keys()
    for key, value in client.items():
        assert out[key].dtype == value.dtype
        assert torch.equal(out[key], value), key


@pytest.mark.parametrize("slicing", ["static", "rolling"])
def test_one_sub_client_overwrites_exactly_its_slice(slicing):
    full, sub, idx = _full_and_indices("cnn", 0.25, slicing, server_round=5)
    glob = full.state_dict()
    client = {k: v + 1.0 for k, v in extract_submodel(glob, idx).items()}
    sub.load_state_dict(client)
    out = aggregate_submodels(glob, [client], [idx], [7.0])
    for key, value in glob.items():
        mask = _covered(tuple(value.shape), idx[key])
        assert torch.allclose(out[key][mask], value[mask] + 1.0), key
        assert torch.equal(out[key][~mask], value[~mask]), key
    assert torch.equal(extract_submodel(out, idx)["body.7.weight"], client["body.7.weight"])
