"""docs/methods.md's inference tables against the configs: each method's recipe, key by key.

Under "Inference, per method" each method has a table ``### M<n> inference: `<config>``` with four
columns: paper | config key | value in the file | MATCH, or CHOSEN with the reason. Every row's key
cell names config ids (``inference_recipe#tta``, ``output_type``; ``configs/inference.yaml::overlap``
is read from that file) whose values, the plain values before any ``;`` of the value cell, must be
what MONAI's ``ConfigParser`` makes of the method's config stack; and every key of the method's
recipe must have a row.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser
from test_methods_table import _split_top_level

from bundle.plan.recipes import normalise_recipe

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"
STACKS = {
    "M1": ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m1_la_resunet.yaml"],
    "M2": ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m2_resunet_tversky.yaml"],
    "M3": ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m3_resse_lka_unet.yaml"],
    "M4": ["configs/train.yaml"],
}
KEY = re.compile(r"`((?:configs/[\w/]+\.yaml::)?[a-z_#]+)`")  # a config id, optionally of another file
RECIPE = "inference_recipe#"


def _rows(method: str) -> list[list[str]]:
    """The cells of each row of ``### <method> inference: `<its config>```."""
    rows, inside = [], False
    for line in METHODS.read_text().splitlines():
        if line.startswith("#"):
            inside = line.startswith(f"### {method} inference: `{STACKS[method][-1]}`")
        elif inside and line.startswith("| ") and not line.startswith(("| paper", "|---")):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _values(cell: str) -> list[object]:
    """The plain values of a value cell (before any ``;``), split at top-level commas; None for prose."""
    values = []
    for part in _split_top_level(cell.split(";")[0]):
        try:
            value = yaml.safe_load(part)
        except yaml.YAMLError:
            value = None
        # e.g. gaussian, classes, cross, and the class a preprocessing step names
        name = isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.]*", value)
        values.append(value if name or isinstance(value, (int, float, bool, list)) else None)
    return values


def _parsed(files: list[str]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in files])
    return parser


@pytest.mark.parametrize("method", sorted(STACKS))
def test_each_inference_row_says_match_or_chosen_and_matches_the_config(method: str) -> None:
    rows = _rows(method)
    assert rows, f"docs/methods.md has no '### {method} inference: `{STACKS[method][-1]}`' table"
    stack = _parsed(STACKS[method])
    checked = 0
    for cells in rows:
        line = " | ".join(cells)
        assert len(cells) == 4, f"an inference row is paper | key | value | MATCH or CHOSEN: {line}"
        assert cells[3] == "MATCH" or re.fullmatch(r"CHOSEN: \S.{10,}", cells[3]), f"MATCH, or CHOSEN: reason: {line}"
        keys = KEY.findall(cells[1])
        assert keys and len(keys) == len(re.findall(r"`[^`]+`", cells[1])), f"config ids only in the key cell: {line}"
        values = _values(cells[2])
        if len(values) != len(keys) or any(v is None for v in values):
            assert all("::" in k for k in keys), f"a recipe row needs one plain value per key: {line}"
            continue  # a row on another file's key that holds no plain value (e.g. a checkpoint to give)
        for key, value in zip(keys, values, strict=True):
            file, _, key = key.rpartition("::")
            parser = _parsed([file]) if file else stack
            assert key in parser, f"docs/methods.md names {key!r}, which {file or STACKS[method][-1]} lacks: {line}"
            assert parser.get_parsed_content(key) == value, f"{key} != {value!r} in {file or 'the stack'}: {line}"
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("method", sorted(STACKS))
def test_every_recipe_key_has_a_row(method: str) -> None:
    keys = [k for cells in _rows(method) for k in KEY.findall(cells[1])]
    documented = {k.removeprefix(RECIPE) for k in keys if k.startswith(RECIPE)}
    stack = _parsed(STACKS[method])
    recipe = normalise_recipe(stack.get_parsed_content("inference_recipe"), stack.get_parsed_content("output_type"))
    assert documented == set(recipe), (
        f"{method}: rows for {documented - set(recipe)}, none for {set(recipe) - documented}"
    )
