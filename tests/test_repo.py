"""Repository contracts: README commands, CI script and bundle metadata stay in step."""

from __future__ import annotations

import json
import re

from conftest import REPO_ROOT

from bundle.constants import MODALITIES, REGION_NAMES


def _readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_starts_with_demo_and_test_commands() -> None:
    demo, tests = _readme_commands()[:2]
    assert "-m bundle demo" in demo and "pip install" in demo
    assert "-m pytest" in tests and "pip install" in tests


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_command = _readme_commands()[1]
    ci_lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_metadata_channels_come_from_the_constants() -> None:
    meta = json.loads((REPO_ROOT / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert next(iter(fmt["inputs"])) == "image" and next(iter(fmt["outputs"])) == "pred"
    channel_names = [name.lower() for name in fmt["inputs"]["image"]["channel_def"].values()]
    assert channel_names == list(MODALITIES)
    assert list(fmt["outputs"]["pred"]["channel_def"].values()) == list(REGION_NAMES)
    assert meta["version"] in meta["changelog"]
