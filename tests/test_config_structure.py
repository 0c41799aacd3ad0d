"""Config structure: pieces other files override are named, never list positions; plain values only.

A reference such as ``deterministic_transforms#6`` breaks silently when someone inserts a transform;
names (``intensity_transform``, ``train#named_handlers#stats``) do not. The demo's settings live in
configs/demo.yaml alone, so no other config switches on a demo flag.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from monai.bundle import ConfigParser

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIGS.rglob("*.yaml"))
# "#<number>" inside a config id: as a key ("a#3: ...") or in a reference ("@a#3", "%file::a#3")
POSITION = re.compile(r"(?:#|::)\d+(?![\w.])")


def _strings(config: object) -> list[str]:
    """Every string value of a loaded YAML file, at any depth."""
    if isinstance(config, dict):
        return [s for value in config.values() for s in _strings(value)]
    if isinstance(config, list):
        return [s for value in config for s in _strings(value)]
    return [config] if isinstance(config, str) else []


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_no_config_refers_to_a_list_position(path: Path) -> None:
    config = yaml.safe_load(path.read_text()) or {}
    found = [f"key {key!r}" for key in config if POSITION.search(str(key))]  # "a#6: ..." overrides
    for value in _strings(config):  # references inside values: "@a#6", "%file::a#6"
        found += [repr(ref) for ref in re.findall(r"[@%][\w:./#-]+", value) if POSITION.search(ref)]
    assert not found, f"{path.name} refers to list positions (give the piece a name): {found}"


def test_the_position_check_sees_what_it_must() -> None:
    """The rule above, on the forms that used to be in the configs."""
    assert POSITION.search("deterministic_transforms#6")
    assert POSITION.search("train#handlers#2#_disabled_")
    assert POSITION.search("%configs/train.yaml::deterministic_transforms#7")
    assert not POSITION.search("train#named_handlers#stats#_disabled_")
    assert not POSITION.search("bundle.transforms.CLAHEd")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_only_the_demo_overlay_knows_the_demo(path: Path) -> None:
    if path.name == "demo.yaml":
        return
    config = yaml.safe_load(path.read_text()) or {}
    assert not {"demo", "is_demo", "demo_dir"} & set(config), f"{path.name}: demo settings belong in demo.yaml"
    assert "@is_demo" not in path.read_text() and "@demo" not in path.read_text(), path.name


def test_the_demo_overlay_holds_every_demo_setting() -> None:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.yaml"), str(CONFIGS / "demo.yaml")])
    assert parser["epochs"] == 40 and parser["patch_size"] == [64, 64, 64] and parser["cache"] == "memory"
    assert parser["network_factory"]["filters"] == [8, 16, 32, 64, 80, 80]  # the default's 6 levels at 1/4 width
    plain = ConfigParser()
    plain.read_config(str(CONFIGS / "train.yaml"))
    assert plain["epochs"] == 300 and plain["patch_size"] == [128, 128, 128]
    assert plain["network_factory"]["filters"] == [32, 64, 128, 256, 320, 320]


def test_training_without_data_says_what_to_do(tmp_path: Path) -> None:
    from bundle.errors import DataError

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser["output_dir"] = str(tmp_path / "out")
    with pytest.raises(Exception) as caught:
        parser.get_parsed_content("datalist_file")
    error = caught.value if isinstance(caught.value, DataError) else caught.value.__cause__
    assert isinstance(error, DataError)
    assert "--dataset_dir DIR" in str(error) and "configs/demo.yaml" in str(error)


def test_monai_bundle_run_training_without_data_ends_with_what_to_do(tmp_path: Path) -> None:
    """What a newcomer types first: one sentence saying what to pass, exit 1, no traceback, no folders."""
    import subprocess
    import sys

    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml"]
    command += ["--output_dir", str(out), "--ckpt_dir", str(tmp_path / "models")]
    result = subprocess.run(command, cwd=CONFIGS.parent, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: no data given: pass --dataset_dir DIR"), last
    assert "configs/demo.yaml" in last and "python -m bundle demo" in last
    assert not out.exists() and not (tmp_path / "models").exists()


# ------------------------------------------------------------------------------------ declarative configs

#: configs/inference.yaml and configs/train.yaml: what a MONAI user reads in one sitting (issue 21)
SIZE_LIMITS = {"inference.yaml": (150, 15), "train.yaml": (300, None)}


def _dollar_lines(text: str) -> int:
    """Lines holding a MONAI expression (a ``$`` value or ``$import``), comments left out."""
    return sum(1 for line in text.splitlines() if "$" in line.split(" #", 1)[0] and not line.lstrip().startswith("#"))


@pytest.mark.parametrize("name", sorted(SIZE_LIMITS))
def test_the_main_configs_stay_declarative(name: str) -> None:
    text = (CONFIGS / name).read_text()
    max_lines, max_expressions = SIZE_LIMITS[name]
    assert len(text.splitlines()) <= max_lines, f"{name}: {len(text.splitlines())} lines (at most {max_lines})"
    if max_expressions is not None:
        assert _dollar_lines(text) <= max_expressions, f"{name}: {_dollar_lines(text)} `$` lines"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_no_config_line_is_over_100_characters(path: Path) -> None:
    long = [n for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 100]
    assert not long, f"{path.name}: lines {long} are over 100 characters"


def test_the_expression_count_reads_expressions_only() -> None:
    assert _dollar_lines("a: $x\n# $y in a comment\nb: 1   # costs $3\n- $import os\n") == 2


def test_one_name_per_window() -> None:
    """The training patch is patch_size and the validation and inference window is window, everywhere."""
    retired = re.compile(r"^\+?(roi_size|val_roi_size|inference_roi_size|slice_size)\b")
    for path in CONFIG_FILES:
        keys = [str(key) for key in (yaml.safe_load(path.read_text()) or {})]
        assert not [k for k in keys if retired.match(k)], f"{path.name} uses a retired window name"
