"""docs/methods.md's tables against the configs: a paper's number lives in one config key, and says so.

Each method section names its config file; every table row whose ``key`` cells are config ids (top-level
keys or ``network_factory#filters``-style paths) and whose ``value`` cell (before any ``;``) lists one
plain value per key is compared with what that config stack parses to. A row that drifts from its
config fails here. Tables with a fourth column give each row a verdict: MATCH (the paper's value) or
CHOSEN (the paper is silent or cannot be followed here, with the reason).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
TWO_D = ("m1_la_resunet", "m2_resunet_tversky", "m3_resse_lka_unet")


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


def _plain(text: str) -> object:
    """A value cell written as a plain YAML number, list or boolean, else None."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if isinstance(value, str):
        return value if re.fullmatch(r"[a-z_]+", value) else None  # a metric or mode name, e.g. val_loss
    return value if isinstance(value, (int, float, bool, list)) else None


def _table_rows() -> list[tuple[str, list[str]]]:
    """(section config, cells) of every body row of the method tables (3 or 4 columns)."""
    rows, config = [], None
    for line in METHODS.read_text().splitlines():
        if line.startswith("## "):
            match = re.search(r"`(configs/[\w/]+\.yaml)`", line)
            config = match.group(1) if match else None
        if config is None or not line.startswith("| ") or line.startswith("| paper") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) in (3, 4):
            rows.append((config, cells))
    return rows


def _rows() -> list[tuple[str, str, list[str], list[object]]]:
    """(section config, row text, keys, values) of every table row that can be checked mechanically."""
    rows = []
    for config, cells in _table_rows():
        line = "| " + " | ".join(cells) + " |"
        keys = re.findall(r"`([a-z_#]+)`", cells[1])  # top-level keys and nested ids (network_factory#...)
        if not keys or len(keys) != len(re.findall(r"`[^`]+`", cells[1])):
            continue  # a key cell that names nested ids or prose
        values = [_plain(v) for v in _split_top_level(cells[2].split(";")[0])]
        if len(values) == len(keys) and all(v is not None for v in values):
            rows.append((config, line, keys, values))
    return rows


ROWS = _rows()


def test_the_table_rows_that_hold_paper_numbers_are_checked() -> None:
    checked = {(Path(config).stem, tuple(keys)) for config, _, keys, _ in ROWS}
    # the rows added with their config keys; more rows join as they are written this way
    assert ("m3_resse_lka_unet", ("subset_fraction", "subset_seed", "num_folds", "holdout_fraction")) in checked
    assert ("train", ("num_folds", "holdout_fraction")) in checked
    assert ("train", ("monitor", "early_stop_patience", "val_interval")) in checked
    assert ("m2_resunet_tversky", ("monitor", "early_stop_patience")) in checked
    assert ("m3_resse_lka_unet", ("slice_size",)) in checked
    # M4's network, loss and deep supervision (the paper's baseline) and its best setting
    assert ("train", ("network_factory#filters",)) in checked
    assert ("train", ("network_factory#strides",)) in checked
    assert ("train", ("loss#loss#lambda_dice", "loss#loss#lambda_bce")) in checked
    assert ("train", ("upsample_ds_heads",)) in checked
    assert ("train", ("salient_channel", "network_factory#in_channels")) in checked
    assert ("m4_resunet_ds", ("network_factory#filters",)) in checked
    assert ("m4_resunet_ds", ("salient_channel", "network_factory#in_channels", "input_channels")) in checked
    assert len(ROWS) >= 4


def test_every_row_of_a_four_column_table_has_a_verdict() -> None:
    four = [(config, cells) for config, cells in _table_rows() if len(cells) == 4]
    assert {Path(config).stem for config, _ in four} >= {"train", "m4_resunet_ds"}
    for config, cells in four:
        assert re.match(r"(MATCH|CHOSEN)\b", cells[3]), f"{config}: no MATCH / CHOSEN verdict: {cells}"


@pytest.mark.parametrize(
    ("config", "line", "keys", "values"), ROWS, ids=[f"{Path(r[0]).stem}:{'+'.join(r[2])}" for r in ROWS]
)
def test_each_row_matches_its_config(config: str, line: str, keys: list[str], values: list[object]) -> None:
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in _stack(config)])
    for key, value in zip(keys, values):
        assert key in parser, f"docs/methods.md names {key!r}, which {config} does not have: {line}"
        assert parser.get_parsed_content(key) == value, f"{config} {key} != {value!r} (docs/methods.md: {line})"
