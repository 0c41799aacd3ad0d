"""Run the shell commands the docs show, on the demo phantoms, so a doc cannot drift from the code.

Every fenced ```bash block of README.md and docs/guides/*.md is read; each command in it (continuation
lines joined, comments dropped) is either run or skipped with a reason that the report prints:

* ``# docs-check: skip (reason)`` on a line of its own skips the rest of its block; at the end of a
  command it skips that command only;
* the README's two install commands are skipped here: ``.ci/run`` runs them on a fresh clone.

What runs, runs in one working folder made once (a copy of ``configs/``, a small BraTS 2021-layout
dataset of 7 labelled demo phantoms, and one tiny trained
``models/model.pt``; a command with ``configs/demo.yaml`` trains on that dataset too), with
``PYTHONPATH`` set to this repository and ``python`` meaning this interpreter. The guides run in
:data:`GUIDES` order, so a guide may use what an earlier one wrote (``runs/train/datalist.json``, the
predictions in ``OUT``). The docs' placeholders (``/data/BraTS2021``, ``CASE_DIR``, ``OUT``, ...) become
demo paths (:data:`PLACEHOLDERS`), and the expensive commands get cheap overrides (:data:`OVERRIDES`:
one epoch of two steps of a 4 -> 8 filter network on 64^3 patches, one fold of a cross-validation).
Each block runs as one ``bash -e`` script, so a ``cd`` or ``export`` holds for the block's later commands.

    python scripts/check_docs.py                     # run everything; exit status 1 if a command failed
    python scripts/check_docs.py --list              # what would run and what is skipped, nothing run
    python scripts/check_docs.py --only segment,evaluate --keep /tmp/docs_check
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

#: The guides in the order they run (later ones use what earlier ones wrote); any other guide follows.
GUIDES = (
    "train-gpu",
    "train-cpu",
    "segment",
    "evaluate",
    "cross-validation",
    "export-model-zoo",
    "monai-label-slicer",
    "add-method",
)

MARKER = re.compile(r"#\s*docs-check:\s*skip\s*\((?P<reason>[^)]*)\)")

#: README commands run elsewhere (the fresh-clone install): substring -> reason.
BUILT_IN_SKIPS = {
    "pip install": "installs into a new venv; .ci/run runs the README's install commands on a fresh clone",
}

#: The phantoms' size, and the case folder CASE_DIR stands for.
SHAPE = (64, 64, 48)
CASE = "Demo_00000"

_FILES = [f"{{case}}/{{name}}_{modality}.nii.gz" for modality in ("t1", "t1ce", "t2", "flair")]

#: Placeholder (a whole word in the docs) -> its demo value; {data}, {case} are filled in at run time.
PLACEHOLDERS: dict[str, str] = {
    "/data/BraTS2021_Training_Data": "{data}",
    "/data/BraTS2021": "{data}",
    "/data/new_cases": "{data}",
    "CASE_DIR": "{case}",
    '"[T1,T1CE,T2,FLAIR]"': '"[' + ",".join(_FILES) + ']"',
    "T1 T1CE T2 FLAIR": " ".join(_FILES),
    "OUT_AVERAGE": "runs/docs_out_average",
    "OUT_CLEAN": "runs/docs_out_clean",
    "OUT_EXTRA": "runs/docs_out_extra",
    "OUT": "runs/docs_out",
}

TINY_TRAINING = {
    "--epochs": "1",
    "--steps_per_epoch": "2",
    "--val_interval": "1",
    "--patch_size": "[64,64,64]",
    "--window": "[64,64,64]",
    "--num_workers": "0",
    "--cache": "memory",
}
TINY_M4 = {"--network_factory#filters": "[4,8,8,8,8,8]"}

#: (pattern a command must match, flags set on it: an existing flag's value is replaced, else appended).
OVERRIDES: tuple[tuple[str, dict[str, str]], ...] = (
    (
        r"monai\.bundle run training .*variants/unet\.yaml",
        {**TINY_TRAINING, "--network_factory#channels": "[4,8,8,8,8]"},
    ),
    (r"monai\.bundle run training (?!.*variants/)", {**TINY_TRAINING, **TINY_M4}),
    (r"configs/cpu\.yaml", {"--average_last_epochs": "1"}),
    # configs/demo.yaml alone would generate the demo's 17 full-size phantoms: the small dataset instead
    (r"configs/demo\.yaml(?!.*--dataset_dir)", {"--dataset_dir": "{data}"}),
    (r"-m bundle cv (?!.*variants/)", {**TINY_TRAINING, **TINY_M4, "--fold_ids": "{first_fold}"}),
)


@dataclass
class Command:
    """One command of a docs block (continuation lines joined), with the reason when it is skipped."""

    text: str
    line: int
    skip: str | None = None  # the reason, when skipped


@dataclass
class Block:
    """One ```bash block: its file, its first line, its commands."""

    path: Path
    line: int
    commands: list[Command] = field(default_factory=list)


def doc_files() -> list[Path]:
    """README.md, then the guides in :data:`GUIDES` order."""
    guides = sorted((REPO_ROOT / "docs" / "guides").glob("*.md"))
    rank = {name: i for i, name in enumerate(GUIDES)}
    guides.sort(key=lambda p: (rank.get(p.stem, len(GUIDES)), p.stem))
    return [REPO_ROOT / "README.md", *guides]


def parse_blocks(path: Path) -> list[Block]:
    """The file's ```bash blocks, each as its commands with their skip reasons."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        block = Block(path, i + 1)
        block_skip: str | None = None
        pending = ""
        start = 0
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            raw = lines[i]
            stripped = raw.strip()
            if not pending and stripped.startswith("#"):
                marker = MARKER.search(stripped)
                if marker:
                    block_skip = marker["reason"].strip() or "no reason given"
            elif stripped:
                if not pending:
                    start = i + 1
                pending += raw.rstrip()
                if pending.endswith("\\"):
                    pending = pending[:-1].rstrip() + " "
                else:
                    block.commands.append(_command(pending, start, block_skip))
                    pending = ""
            i += 1
        if pending:
            block.commands.append(_command(pending, start, block_skip))
        blocks.append(block)
        i += 1
    return blocks


def _command(text: str, line: int, block_skip: str | None) -> Command:
    marker = MARKER.search(text)
    skip = block_skip or (marker["reason"].strip() if marker else None)
    if skip is None:
        skip = next((reason for key, reason in BUILT_IN_SKIPS.items() if key in text), None)
    return Command(_strip_comment(text), line, skip)


def _strip_comment(text: str) -> str:
    """The command without a trailing ``# comment`` (a ``#`` inside quotes or a ``key#path`` stays)."""
    quote = None
    for i, char in enumerate(text):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (i == 0 or text[i - 1].isspace()):
            return text[:i].rstrip()
    return text.strip()


def substitute(command: str, values: dict[str, str]) -> str:
    """The command with the placeholders filled in and the cheap overrides set."""
    for placeholder, value in PLACEHOLDERS.items():
        pattern = r"(?<![\w/.-])" + re.escape(placeholder) + r"(?![\w-])"
        command = re.sub(pattern, lambda _m, v=value: v.format(**values), command)
    command = re.sub(r"(?<![\w/])\.venv/bin/python\b", "python", command)
    for pattern, flags in OVERRIDES:
        if re.search(pattern, command):
            for flag, value in flags.items():
                command = _set_flag(command, flag, value.format(**values))
    return command


def _set_flag(command: str, flag: str, value: str) -> str:
    quoted = shlex.quote(value)
    pattern = re.escape(flag) + r"""(?:[ =](?:"[^"]*"|'[^']*'|\S+))"""
    if re.search(r"(?<!\S)" + pattern, command):
        return re.sub(r"(?<!\S)" + pattern, lambda _m: f"{flag} {quoted}", command, count=1)
    return f"{command} {flag} {quoted}"


def _first_fold(command: str) -> str:
    match = re.search(r"--fold_ids[ =]([0-9]+)", command)
    return match.group(1) if match else "0"


def prepare_workdir(work: Path, python: str, env: dict[str, str]) -> dict[str, str]:
    """configs/, a small BraTS 2021-layout dataset of demo phantoms and one tiny trained ``models/model.pt``."""
    sys.path.insert(0, str(REPO_ROOT))
    from bundle.data.demo import generate_demo_dataset

    shutil.copytree(REPO_ROOT / "configs", work / "configs", dirs_exist_ok=True)
    # 7 labelled phantoms (5 folds after a 20 % hold-out), smaller than the demo's 96 x 96 x 64 so that one
    # 64^3 window covers a cropped case. All labelled, as a downloaded training set: evaluate refuses a
    # prediction without a truth, so the guides segment and score the same labelled cases.
    data = generate_demo_dataset(work / "datasets" / "BraTS2021", num_cases=7, num_test_cases=0, shape=SHAPE)
    values = {"data": str(data), "case": str(data / CASE), "name": CASE}
    seed = (
        "python -m monai.bundle run training --config_file \"['configs/train.yaml','configs/demo.yaml']\" "
        "--dataset_dir /data/BraTS2021 --output_dir runs/docs_seed --ckpt_dir models"
    )
    if (work / "models" / "model.pt").exists():  # a kept folder (--keep) of an earlier check
        return values
    result = _run_script(substitute(seed, values), work, env, timeout=1200)
    if result.returncode != 0 or not (work / "models" / "model.pt").exists():
        sys.stderr.write(result.stdout[-4000:])
        raise SystemExit("check_docs: training the tiny model failed (its output is above)")
    return values


def _run_script(script: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + script],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )


def environment(shim: Path) -> dict[str, str]:
    """This interpreter as ``python``, this repository's package first, one thread per process."""
    shim.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):  # a wrapper, not a link: a venv's interpreter finds its venv by its path
        wrapper = shim / name
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        wrapper.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO_ROOT)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def main(argv: list[str] | None = None) -> int:
    """Run (or with ``--list`` only list) the docs' commands; 1 if a block failed."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print what would run and what is skipped; run nothing")
    ap.add_argument("--only", default=None, help="comma-separated file stems (README, segment, ...)")
    ap.add_argument("--keep", default=None, help="working folder to use and keep (default: a temporary one)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per block")
    args = ap.parse_args(argv)

    files = doc_files()
    if args.only:
        wanted = set(args.only.split(","))
        files = [f for f in files if f.stem in wanted]
    blocks = [block for path in files for block in parse_blocks(path)]
    skipped = [(b, c) for b in blocks for c in b.commands if c.skip]
    to_run = [b for b in blocks if any(not c.skip for c in b.commands)]

    if args.list:
        for block in blocks:
            for cmd in block.commands:
                where = f"{block.path.relative_to(REPO_ROOT)}:{cmd.line}"
                print(f"{'SKIP' if cmd.skip else 'RUN '} {where}: {cmd.text}" + (f"  [{cmd.skip}]" if cmd.skip else ""))
        print(f"{sum(len(b.commands) for b in blocks) - len(skipped)} command(s) to run, {len(skipped)} skipped")
        return 0

    start = time.perf_counter()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="check_docs_"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(work / ".bin")
    print(f"check_docs: working folder {work}", flush=True)
    values = prepare_workdir(work, sys.executable, env)
    print(f"check_docs: demo data and the tiny model ready ({time.perf_counter() - start:.0f} s)", flush=True)

    failures = 0
    ran = 0
    for block in to_run:
        commands = [c for c in block.commands if not c.skip]
        lines = []
        for cmd in commands:
            text = substitute(cmd.text, {**values, "first_fold": _first_fold(cmd.text)})
            lines += [f"echo {shlex.quote('$ ' + text)}", text]
        where = f"{block.path.relative_to(REPO_ROOT)}:{block.line}"
        t0 = time.perf_counter()
        try:
            result = _run_script("\n".join(lines), work, env, args.timeout)
            ok, output = result.returncode == 0, result.stdout
        except subprocess.TimeoutExpired as err:
            ok, output = False, f"{err.output or ''}\ntimed out after {args.timeout:.0f} s"
        ran += len(commands)
        print(f"{'ok  ' if ok else 'FAIL'} {where} ({len(commands)} command(s), {time.perf_counter() - t0:.0f} s)")
        if not ok:
            failures += 1
            print("    " + "\n    ".join(str(output).splitlines()[-40:]))
    for block, cmd in skipped:
        print(f"skip {block.path.relative_to(REPO_ROOT)}:{cmd.line}: {cmd.text[:90]}  [{cmd.skip}]")
    total = time.perf_counter() - start
    print(
        f"check_docs: {ran} command(s) in {len(to_run)} block(s) run, {failures} block(s) failed, "
        f"{len(skipped)} command(s) skipped, {total:.0f} s"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
