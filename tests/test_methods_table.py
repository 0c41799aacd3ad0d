"""docs/methods.md's tables against the configs: a paper's number lives in one config key, and says so.

Each method section (``##``, or ``###`` for a part such as M2's gate) names its config file; every table
row whose ``key`` cells are config ids and whose ``value`` cell (before any ``;``) lists one plain value
per key is compared with what that config stack parses to. A row that drifts from its config fails here.
Tables with a fourth column (paper | config key | value in the file | MATCH / CHOSEN) are checked
completely: every row is compared (or names another config file, whose section checks it) and says
MATCH, or CHOSEN with the reason where the paper is silent or cannot be followed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
TWO_D = ("m1_la_resunet", "m2_resunet_tversky", "m3_resse_lka_unet", "train_gate")
NOT_PLAIN = object()


def _stack(config: str) -> list[str]:
    """The config files a method's file is merged over (docs/methods.md names the last one)."""
    if config == "configs/train.yaml":
        return [config]
    if Path(config).stem in TWO_D:
        return ["configs/train.yaml", "configs/train_2d.yaml", config]
    return ["configs/train.yaml", config]


def _split_top_level(text: str) -> list[str]:
    """``"[1, 2], 3"`` -> ``["[1, 2]", "3"]``: commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[("
        depth -= char in "])"
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()] if current.strip() else parts


def _plain(text: str, names: str = r"[a-z_]+") -> object:
    """A value cell written as a plain YAML number, list, boolean, null or a name matching ``names``, else NOT_PLAIN."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return NOT_PLAIN
    if isinstance(value, str):
        return value if re.fullmatch(names, value) else NOT_PLAIN  # a metric or mode name, e.g. val_loss
    return value if value is None or isinstance(value, (int, float, bool, list)) else NOT_PLAIN


def _table_rows() -> list[tuple[str, str, list[str]]]:
    """(section config, row text, cells) of every table row under a section that names its config."""
    rows, config = [], None
    for line in METHODS.read_text().splitlines():
        if line.startswith(("## ", "### ")):
            match = re.search(r"`(configs/[\w/]+\.yaml)`", line)
            config = match.group(1) if match else None
        if config is None or not line.startswith("| ") or line.startswith("| paper") or line.startswith("|---"):
            continue
        rows.append((config, line, [c.strip() for c in line.strip().strip("|").split("|")]))
    return rows


def _checkable(cells: list[str]) -> tuple[list[str], list[object]] | None:
    """(keys, values) of a row that can be checked mechanically, else None."""
    status_table = len(cells) == 4
    keys = re.findall(r"`([a-z_#]+)`", cells[1])  # top-level keys and nested ids (network_factory#...)
    if not keys or len(keys) != len(re.findall(r"`[^`]+`", cells[1])):
        return None  # a key cell that names ids of another file, or prose
    # four-column tables also name classes and enum values (bundle.networks.ResUNet, BATCH)
    names = r"[A-Za-z_][\w.]*" if status_table else r"[a-z_]+"
    values = [_plain(v, names) for v in _split_top_level(cells[2].split(";")[0])]
    if len(values) != len(keys) or any(v is NOT_PLAIN for v in values):
        return None
    return keys, values


def _rows() -> list[tuple[str, str, list[str], list[object]]]:
    """(section config, row text, keys, values) of every table row that can be checked mechanically."""
    rows = []
    for config, line, cells in _table_rows():
        if len(cells) in (3, 4) and (checked := _checkable(cells)) is not None:
            rows.append((config, line, *checked))
    return rows


ROWS = _rows()
STATUS_ROWS = [(config, line, cells) for config, line, cells in _table_rows() if len(cells) == 4]


def test_the_table_rows_that_hold_paper_numbers_are_checked() -> None:
    checked = {(Path(config).stem, tuple(keys)) for config, _, keys, _ in ROWS}
    # the rows added with their config keys; more rows join as they are written this way
    assert ("m3_resse_lka_unet", ("subset_fraction", "subset_seed", "num_folds", "holdout_fraction")) in checked
    assert ("train", ("num_folds", "holdout_fraction")) in checked
    assert ("train", ("monitor", "early_stop_patience", "val_interval")) in checked
    assert ("m2_resunet_tversky", ("early_stop_patience",)) in checked
    assert ("m3_resse_lka_unet", ("patch_size", "network_factory#in_channels")) in checked
    for method in ("m1_la_resunet", "m2_resunet_tversky", "m3_resse_lka_unet", "train_gate"):
        assert (method, ("batch_size",)) in checked
        assert (method, ("slices_per_volume", "skip_empty_slices")) in checked
    assert ("m3_resse_lka_unet", ("warmup_start", "lr_decay")) in checked
    # M2 as one model: the gate, its head, stopping rule and augmentation, the noise reduction
    assert ("m2_resunet_tversky", ("slice_gate", "gate_threshold")) in checked
    assert ("m2_resunet_tversky", ("noise_reduction", "intensity_transform#denoise#size")) in checked
    gate_head = ("network_factory#_target_", "network_factory#dense_layers", "network_factory#num_classes")
    gate_head += ("output_type",)
    assert ("train_gate", gate_head) in checked
    assert ("train_gate", ("monitor", "early_stop_patience")) in checked
    assert ("train_gate", ("rotation_degrees", "zoom_range")) in checked
    # M4's network, loss and deep supervision (the paper's baseline) and its best setting
    assert ("train", ("network_factory#filters",)) in checked
    assert ("train", ("network_factory#strides",)) in checked
    assert ("train", ("loss_factory#loss#lambda_dice", "loss_factory#loss#lambda_bce")) in checked
    assert ("train", ("upsample_ds_heads",)) in checked
    assert ("train", ("salient_channel", "network_factory#in_channels")) in checked
    assert ("m4_resunet_ds", ("network_factory#filters",)) in checked
    assert ("m4_resunet_ds", ("salient_channel", "network_factory#in_channels", "input_channels")) in checked
    assert len(ROWS) >= 4


@pytest.mark.parametrize(("config", "line", "cells"), STATUS_ROWS, ids=[r[1][:60] for r in STATUS_ROWS])
def test_each_row_of_a_status_table_is_checked_and_says_match_or_chosen(config: str, line: str, cells: list) -> None:
    """Tables with a status column hold no unchecked row: each compares with its config (or names another file)."""
    assert cells[3] == "MATCH" or re.fullmatch(r"CHOSEN: \S.*", cells[3]), f"MATCH, or CHOSEN: reason: {line}"
    assert _checkable(cells) is not None or "`configs/" in cells[1], f"no config key and plain value to check: {line}"


@pytest.mark.parametrize(
    ("config", "line", "keys", "values"), ROWS, ids=[f"{Path(r[0]).stem}:{'+'.join(r[2])}" for r in ROWS]
)
def test_each_row_matches_its_config(config: str, line: str, keys: list[str], values: list[object]) -> None:
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in _stack(config)])
    for key, value in zip(keys, values):
        assert key in parser, f"docs/methods.md names {key!r}, which {config} does not have: {line}"
        assert parser.get_parsed_content(key) == value, f"{config} {key} != {value!r} (docs/methods.md: {line})"
