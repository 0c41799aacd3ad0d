"""Tests for bundle/: label-scheme mapping, bounding boxes and connected components, one helper each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from bundle.constants import BACKGROUND, ED, ET, LABEL_SCHEMES, NCR
from bundle.data.labels import (
    INTERNAL,
    bounding_box,
    connected_components,
    from_internal,
    scheme_values,
    to_internal,
    unknown_label_values,
)

INTERNAL_LABELS = [BACKGROUND, NCR, ED, ET]


@pytest.mark.parametrize("scheme", sorted(LABEL_SCHEMES))
@pytest.mark.parametrize("kind", ["numpy", "torch", "meta"])
def test_schemes_round_trip_and_keep_type_and_dtype(scheme: str, kind: str) -> None:
    values = sorted(LABEL_SCHEMES[scheme])
    array = np.array(values * 3, dtype=np.int16).reshape(1, 3, len(values))
    labels = {"numpy": array, "torch": torch.as_tensor(array), "meta": MetaTensor(torch.as_tensor(array))}[kind]
    internal = to_internal(labels, scheme)
    assert type(internal) is type(labels) and internal.dtype == labels.dtype
    expected = [LABEL_SCHEMES[scheme][v] for v in values] * 3
    assert np.asarray(internal).ravel().tolist() == expected
    back = from_internal(internal, scheme)
    assert np.asarray(back).ravel().tolist() == values * 3
    assert np.asarray(labels).ravel().tolist() == values * 3  # the input is not modified


def test_mapping_swaps_values_without_chaining() -> None:
    # MSD: 1 edema, 2 non-enhancing core; internal 1 NCR, 2 ED: 1 and 2 swap, and must not map twice
    msd = torch.tensor([[0, 1, 2, 3]])
    assert to_internal(msd, "msd").tolist() == [[BACKGROUND, ED, NCR, ET]]
    assert from_internal(torch.tensor([[0, 1, 2, 3]]), "brats2021").tolist() == [[0, 1, 2, 4]]


def test_internal_scheme_is_the_identity_and_unknowns_are_found() -> None:
    assert scheme_values(INTERNAL) == {v: v for v in INTERNAL_LABELS}
    labels = np.array([0, 1, 2, 4])
    assert to_internal(labels, INTERNAL).tolist() == [0, 1, 2, 4]  # 4 is not mapped, and reported:
    assert unknown_label_values(labels, INTERNAL) == [4]
    assert unknown_label_values(torch.tensor([0.0, 1.0, 2.5, 3.0]), "brats2023") == [2.5]
    assert unknown_label_values(np.array([0, 1, 2, 4]), "brats2021") == []
    with pytest.raises(ValueError, match="unknown label scheme 'brats2019'"):
        scheme_values("brats2019")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_bounding_box_margin_clipping_and_empty(kind: str) -> None:
    mask = np.zeros((10, 8, 6), bool)
    mask[2:5, 0:3, 5] = True
    mask = torch.as_tensor(mask) if kind == "torch" else mask
    assert bounding_box(mask) == (slice(2, 5), slice(0, 3), slice(5, 6))
    assert bounding_box(mask, margin=2) == (slice(0, 7), slice(0, 5), slice(3, 6))  # clipped at the borders
    assert bounding_box(mask[..., :5]) is None
    assert bounding_box(np.array([[0, 3], [0, 0]])) == (slice(0, 1), slice(1, 2))  # any non-zero value


def test_connected_components_sizes_and_connectivity() -> None:
    mask = np.zeros((6, 6, 6), bool)
    mask[0:2, 0:2, 0:2] = True  # 8 voxels
    mask[2, 2, 2] = True  # touches the cube at a corner only
    mask[5, 5, 0:3] = True  # 3 voxels
    components, sizes = connected_components(mask)
    assert sorted(sizes[1:].tolist()) == [3, 9]  # full (26-) connectivity joins the corner voxel
    assert sizes[0] == mask.size - 12 and components.shape == mask.shape
    _, faces = connected_components(torch.as_tensor(mask), connectivity=1)
    assert sorted(faces[1:].tolist()) == [1, 3, 8]
    empty_components, empty_sizes = connected_components(np.zeros((3, 3), bool))
    assert empty_sizes.tolist() == [9] and not empty_components.any()
