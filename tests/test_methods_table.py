"""docs/methods.md's tables against the configs: a paper's number lives in one config key, and says so.

Each method section (``## ``, and its ``### ... inference`` table) names its config file; every table
row whose ``key`` cells are config ids (``output_type``, ``inference_recipe#tta``; a
``configs/inference.yaml::overlap`` cell is read from that file) and whose ``value`` cell (before any
``;``) lists one plain value per key is compared with what that config stack parses to. A row that
drifts from its config fails here. The inference tables have a fourth column, MATCH or CHOSEN with
its reason, and list every key of their method's recipe.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser

from bundle.recipes import normalise_recipe

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


KEY = r"(?:configs/[\w/]+\.yaml::)?[a-z_#]+"  # a config id, optionally in another file (MONAI's macro form)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table_lines() -> list[tuple[str, str]]:
    """(section config, line) of every table row, the section being the last ``##``/``###`` heading naming a config."""
    lines, config = [], None
    for line in METHODS.read_text().splitlines():
        if line.startswith("## ") or line.startswith("### "):
            match = re.search(r"`(configs/[\w/]+\.yaml)`", line)
            config = match.group(1) if match else None
        elif config is not None and line.startswith("| ") and not line.startswith("| paper"):
            lines.append((config, line))
    return lines


def _rows() -> list[tuple[str, str, list[str], list[object]]]:
    """(section config, row text, keys, values) of every table row that can be checked mechanically."""
    rows = []
    for config, line in _table_lines():
        cells = _cells(line)
        if len(cells) not in (3, 4):
            continue
        keys = re.findall(rf"`({KEY})`", cells[1])  # top-level keys and nested ids (network_factory#...)
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
    assert ("train", ("inference_recipe#tta",)) in checked
    assert ("train", ("configs/inference.yaml::overlap",)) in checked
    assert ("m3_resse_lka_unet", ("output_type",)) in checked
    assert len(ROWS) >= 4


@pytest.mark.parametrize(
    ("config", "line", "keys", "values"), ROWS, ids=[f"{Path(r[0]).stem}:{'+'.join(r[2])}" for r in ROWS]
)
def test_each_row_matches_its_config(config: str, line: str, keys: list[str], values: list[object]) -> None:
    for key, value in zip(keys, values):
        file, _, key = key.rpartition("::")
        parser = ConfigParser()
        parser.read_config([str(ROOT / f) for f in ([file] if file else _stack(config))])
        where = file or config
        assert key in parser, f"docs/methods.md names {key!r}, which {where} does not have: {line}"
        assert parser.get_parsed_content(key) == value, f"{where} {key} != {value!r} (docs/methods.md: {line})"


# ------------------------------------------------------------------------------------ inference tables

METHOD_CONFIGS = {
    "M1": "configs/variants/m1_la_resunet.yaml",
    "M2": "configs/variants/m2_resunet_tversky.yaml",
    "M3": "configs/variants/m3_resse_lka_unet.yaml",
    "M4": "configs/train.yaml",
}


def _inference_table(method: str) -> list[str]:
    """The rows of ``### <method> inference: `<config>```."""
    rows, inside = [], False
    for line in METHODS.read_text().splitlines():
        if line.startswith("#"):
            inside = line.startswith(f"### {method} inference: `{METHOD_CONFIGS[method]}`")
        elif inside and line.startswith("| ") and not line.startswith("| paper"):
            rows.append(line)
    return rows


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_each_method_has_an_inference_table_with_every_recipe_key(method: str) -> None:
    rows = _inference_table(method)
    assert rows, f"docs/methods.md has no '### {method} inference: `{METHOD_CONFIGS[method]}`' table"
    for line in rows:
        cells = _cells(line)
        assert len(cells) == 4, f"an inference row has paper | key | value | MATCH or CHOSEN: {line}"
        status, _, reason = cells[3].partition(":")
        assert status in ("MATCH", "CHOSEN"), f"the fourth cell starts with MATCH or CHOSEN: {line}"
        assert status == "MATCH" or len(reason.strip()) > 10, f"a CHOSEN row says why: {line}"
    documented = {k.partition("#")[2] for line in rows for k in re.findall(r"`(inference_recipe#[a-z_]+)`", line)}
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in _stack(METHOD_CONFIGS[method])])
    recipe = normalise_recipe(parser.get_parsed_content("inference_recipe"), parser.get_parsed_content("output_type"))
    assert documented == set(recipe), f"{method}: recipe keys without a row: {set(recipe) - documented}"
    # and each documented key is checked against the file (a row the parser above reads)
    checked = {k.partition("#")[2] for c, _, keys, _ in ROWS if c == METHOD_CONFIGS[method] for k in keys}
    assert documented <= checked, f"{method}: rows not checked against the config: {documented - checked}"
