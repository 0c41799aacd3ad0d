"""The docs: every relative link resolves, every guide stays short, every shown command is run or skipped with a reason.

The commands themselves run in ``scripts/check_docs.py`` (slow: it trains a tiny model and runs the
guides' commands on the demo phantoms); ``.ci/run`` runs it after the slow tests.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", REPO_ROOT / "scripts" / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _markdown_files() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]


def test_every_relative_link_in_the_docs_resolves() -> None:
    broken = []
    for path in _markdown_files():
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a code block's brackets are not links
        for target in LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # https:, mailto:, an anchor in the same page
            if not (path.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{path.relative_to(REPO_ROOT)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_guides_are_at_most_200_lines() -> None:
    long = {
        p.name: n for p in (REPO_ROOT / "docs" / "guides").glob("*.md") if (n := len(p.read_text().splitlines())) > 200
    }
    assert not long, f"guides over 200 lines: {long}"


def test_every_guide_command_is_run_or_skipped_with_a_reason() -> None:
    check_docs = _check_docs()
    files = check_docs.doc_files()
    assert {p.stem for p in files} >= {"README", *check_docs.GUIDES}
    commands = [c for path in files for block in check_docs.parse_blocks(path) for c in block.commands]
    assert len([c for c in commands if not c.skip]) >= 30, "the docs check would run almost nothing"
    assert all(c.skip.strip() for c in commands if c.skip is not None)


def test_placeholders_become_demo_paths_and_expensive_commands_get_cheap_overrides() -> None:
    check_docs = _check_docs()
    values = {"data": "/tmp/d", "case": "/tmp/d/Demo_00016", "name": "Demo_00016", "first_fold": "1"}
    train = check_docs.substitute(
        "python -m monai.bundle run training --config_file \"['configs/train.yaml','configs/cpu.yaml']\" "
        "--dataset_dir /data/BraTS2021 --epochs 300",
        values,
    )
    assert "--dataset_dir /tmp/d " in train and "--epochs 1" in train and "--epochs 300" not in train
    assert "--average_last_epochs 1" in train and "--network_factory#filters" in train
    cv = check_docs.substitute("python -m bundle cv --folds 5 --fold_ids 1,3,4 --dataset_dir /data/BraTS2021", values)
    assert "--fold_ids 1" in cv and "1,3,4" not in cv
    infer = check_docs.substitute("python -m bundle infer CASE_DIR --output OUT_CLEAN --tta false", values)
    assert infer == "python -m bundle infer /tmp/d/Demo_00016 --output runs/docs_out_clean --tta false"
    assert check_docs._strip_comment("python x --a#b 1   # a comment") == "python x --a#b 1"


@pytest.mark.slow
@pytest.mark.docs
def test_docs_check_runs_the_commands_of_the_readme_and_the_guides() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "check_docs.py")],
        cwd=REPO_ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert result.returncode == 0, result.stdout[-8000:]
