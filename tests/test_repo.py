"""Repository contracts: README commands, CI script and bundle metadata stay in step."""

from __future__ import annotations

import ast
import fnmatch
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


def _test_functions() -> dict[str, set[str]]:
    """Every test file's ``test_*`` function names."""
    return {
        path.name: {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        for path in (REPO_ROOT / "tests").glob("test_*.py")
    }


def _reliability_rows() -> list[list[str]]:
    """The cells of each row of docs/reliability.md's table of what the user sees."""
    text = (REPO_ROOT / "docs" / "reliability.md").read_text()
    table = text.split("| bad input or event |", 1)[1].split("\n\n", 1)[0]
    return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in table.splitlines()[2:]]


def test_every_row_of_docs_reliability_md_names_tests_that_exist() -> None:
    """The probe table cannot drift: each row's tests exist, under the names it gives.

    A cell names ``file.py::test_name`` (a ``*`` matches several), a further ``test_name`` of the file
    named before it, a whole ``file.py``, or ``same`` (the previous row's tests; its file for the names after).
    """
    functions = _test_functions()
    rows = _reliability_rows()
    assert len(rows) >= 30
    previous: list[str] = []
    current: str | None = None
    for cells in rows:
        assert len(cells) == 4, cells
        names = re.findall(r"`([^`]+)`", cells[3])
        if cells[3].startswith("same"):
            assert previous, cells
        else:
            assert names, f"a row without tests: {cells[0]}"
            current = None
        for name in names:
            file, _, function = name.partition("::")
            if file.endswith(".py"):
                assert file in functions, f"{cells[0]}: no tests/{file}"
                current = file
            else:
                file, function = current, name
            assert file is not None, f"{cells[0]}: {name} names no file"
            if function:
                found = [f for f in functions[file] if fnmatch.fnmatchcase(f, function.split("[")[0])]
                assert found, f"{cells[0]}: tests/{file} has no {function}"
        previous = names or previous
