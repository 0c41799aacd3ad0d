"""How the bundle reads option values: one table of every option, checked before any work starts.

``python -m bundle CMD --tta false`` (Fire) and ``python -m monai.bundle run ... --tta false``
both hand the *string* ``"false"`` to the code, and ``bool("false")`` is ``True``. Every boolean key
of every config and every boolean flag of the command line is therefore read by :func:`as_bool`
(configs as ``$bundle.options.as_bool(@tta, 'tta')``), and a value it does not know is an
:class:`bundle.errors.OptionError` naming the key, never a guess.

Every other option a user types has one row in :data:`OPTIONS` (a whole number of at least 1, a
fraction, one of a few words, a device, a folder to write in, ...). :func:`check_options` checks the
values against it: the command-line functions call it first, and each training config calls it in
one ``initialize`` step, so ``--epochs 0``, ``--cache ram`` or ``--device cuda`` without a GPU stop
with one sentence before a case is read or a folder is made. :func:`check_command_flags` refuses a
flag a fixed-signature command does not take, naming the closest one it does (:func:`closest`).

This module imports nothing of the bundle but its errors: every other module may use it.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.errors import OptionError

__all__ = [
    "COMMAND_OPTIONS",
    "OPTIONS",
    "Rule",
    "as_bool",
    "check_command_flags",
    "check_flags",
    "check_options",
    "closest",
    "folder_problem",
]

#: on/off, which MONAI's ``str2bool`` does not know, as the words it does
_ON_OFF = {"on": "true", "off": "false"}


def as_bool(value: Any, name: str = "value") -> bool:
    """Read ``value`` of option ``name`` as a boolean.

    Accepts ``True``/``False``, the integers 1/0 and, in any letter case (surrounding spaces
    ignored), the strings MONAI's :func:`monai.utils.str2bool` reads (true/false, yes/no, t/f, y/n,
    1/0) plus on/off. Anything else (``None``, ``"ture"``, ``2``, a list) raises
    :class:`~bundle.errors.OptionError` with one sentence naming the option: ``str2bool``'s own
    ``ValueError`` names neither the option nor on/off, hence this wrapper.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return as_bool(value.item(), name)
    if isinstance(value, str):
        # imported here: ``import bundle`` (this module) stays standard-library only, no torch
        from monai.utils import str2bool

        word = value.strip().lower()
        try:
            return str2bool(_ON_OFF.get(word, word))
        except ValueError:
            pass  # the sentence below names the option
    raise OptionError(f"{name}: {value!r} is not a boolean; use one of true/false, yes/no, on/off, 1/0")


def check_flags(**flags: Any) -> dict[str, bool]:
    """Read every ``name=value`` with :func:`as_bool`; a config's first ``initialize`` steps call it.

    Each boolean key is read again where it is used; reading them all up front makes a misspelt
    value stop the run before any case is read or any folder is made.
    """
    return {name: as_bool(value, name) for name, value in flags.items()}


# ------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Rule:
    """What one option may be.

    ``kind``: ``int`` (a whole number), ``float``, ``bool``, ``choice`` (one of ``choices``), ``device``
    (a torch device this machine has), ``folder`` (a folder that is, or can be made, writable), ``file``
    (a file to write: not a folder, in a folder one can write in) or ``datalist`` (an existing datalist
    JSON whose files all exist). ``low`` / ``high`` bound numbers (``open``: the bound itself excluded);
    ``null``: ``None`` is accepted (the config's default); ``hint`` ends the sentence of a refused value.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[str, ...] = ()
    null: bool = False
    hint: str = ""
    what: str = ""


_FOLDER = Rule("folder", what="the output folder")
#: Every option a user types, by name: the command-line flags and the training configs' keys.
OPTIONS: dict[str, Rule] = {
    # training (configs/train.yaml, checked in its initialize)
    "epochs": Rule("int", low=1),
    "val_interval": Rule("int", low=1),
    "batch_size": Rule("int", low=1),
    "num_samples": Rule("int", low=1),
    "num_workers": Rule("int", low=0),
    "learning_rate": Rule("float", low=0.0),  # 0 freezes the weights: tests use it (early stopping)
    "weight_decay": Rule("float", low=0.0),
    "early_stop_patience": Rule("int", low=1),
    "cache": Rule("choice", choices=("memory", "disk", "none")),
    "device": Rule("device", null=True),
    "fold": Rule("int", low=0),
    "num_folds": Rule("int", low=1),
    "seed": Rule("int"),
    "subset_seed": Rule("int"),
    "holdout_fraction": Rule("float", low=0.0, high=1.0, open_high=True),
    "subset_fraction": Rule("float", low=0.0, high=1.0, open_low=True),
    "datalist": Rule("datalist", null=True),
    "output_dir": _FOLDER,
    "ckpt_dir": Rule("folder", what="the checkpoint folder (ckpt_dir)"),
    "layout": Rule("choice", choices=("brats2021", "brats2023", "msd"), null=True),
    # the command line's own
    "folds": Rule("int", low=1),
    "n_bootstrap": Rule("int", low=1),
    "alpha": Rule("float", low=0.0, high=1.0, open_low=True, open_high=True),
    "overlays": Rule("int", low=0),
    "port": Rule("int", low=1, high=65535),
}
#: Where one command's flag means something else than the table's option of that name.
COMMAND_OPTIONS: dict[str, dict[str, Rule]] = {
    "prepare": {"output": Rule("file", what="the datalist file")},
    "compare": {"output": Rule("file", what="the comparison table"), "output_dir": _FOLDER},
    "cv": {
        "folds": Rule(
            "int",
            low=2,
            hint="cross-validation needs 2 folds or more (with one, a model is scored on the cases it trained on)",
        ),
        "scoring": Rule("choice", choices=("recipe", "raw")),
        "seeds": Rule("int", low=1),
    },
    "demo": {"epochs": Rule("int", low=1, null=True)},
    # a training request to MONAI Label (POST /train/<model>: Slicer's training options)
    "label_train": {
        "max_epochs": Rule("int", low=1),
        "val_split": Rule(
            "float",
            low=0.0,
            high=1.0,
            open_low=True,
            open_high=True,
            hint="the served training validates on this fraction of the labelled cases",
        ),
    },
}


def check_options(command: str | None = None, /, **values: Any) -> dict[str, Any]:
    """Check every ``name=value`` against :data:`OPTIONS` (and ``command``'s own rows); return the values read.

    Numbers come back as ``int`` / ``float``, booleans as ``bool``, folders and files as absolute paths.
    The first value that does not fit raises :class:`~bundle.errors.OptionError` with one sentence naming
    the option and what it may be. A name the table does not know is an error too (a typo in a caller).
    Also checked together: ``fold`` within the folds (``num_folds``, or those of ``datalist``).
    """
    rules = {**OPTIONS, **COMMAND_OPTIONS.get(command or "", {})}
    read: dict[str, Any] = {}
    for name, value in values.items():
        if name not in rules:
            raise OptionError(f"{name}: no rule for this option in bundle.options.OPTIONS{_suggestion(name, rules)}")
        read[name] = _check(name, value, rules[name])
    _check_fold(read)
    return read


def _check(name: str, value: Any, rule: Rule) -> Any:
    """One value read by its rule, or an :class:`OptionError` naming ``name``."""
    if value is None:
        if rule.null:
            return None
        raise OptionError(_sentence(name, value, "is not set", rule))
    if rule.kind == "bool":
        return as_bool(value, name)
    if rule.kind in ("int", "float"):
        return _number(name, value, rule)
    if rule.kind == "choice":
        word = str(value)
        if word not in rule.choices:
            near = closest(word, rule.choices)
            raise OptionError(
                f"{name}: {value!r} is not one of {', '.join(rule.choices)}"
                + (f"; did you mean {near}?" if near else "")
            )
        return word
    if rule.kind == "device":
        return _device(name, value)
    if rule.kind == "folder":
        problem = folder_problem(value, rule.what or f"the {name} folder")
        if problem:
            raise OptionError(f"{name}: {problem}")
        return str(Path(str(value)).absolute())
    if rule.kind == "file":
        return _output_file(name, value, rule)
    if rule.kind == "datalist":
        return _datalist(name, value)
    raise ValueError(f"unknown option kind {rule.kind!r} of {name}")


def _sentence(name: str, value: Any, problem: str, rule: Rule) -> str:
    return f"{name}: {value!r} {problem}" + (f"; {rule.hint}" if rule.hint else "")


def _number(name: str, value: Any, rule: Rule) -> int | float:
    """An ``int`` / ``float`` within the rule's bounds (a numeric string is read: ``"3"`` is 3)."""
    whole = rule.kind == "int"
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        number = None
    else:
        try:
            number = (int(value) if isinstance(value, (int, str)) else value) if whole else float(value)
        except ValueError:
            number = None
    if number is None or (whole and isinstance(value, float)) or not math.isfinite(number):
        raise OptionError(_sentence(name, value, f"is not {kind}", rule))
    too_low = rule.low is not None and (number <= rule.low if rule.open_low else number < rule.low)
    too_high = rule.high is not None and (number >= rule.high if rule.open_high else number > rule.high)
    if too_low or too_high:
        raise OptionError(_sentence(name, value, f"is not allowed: use {kind} {_bounds(rule)}", rule))
    return number


def _bounds(rule: Rule) -> str:
    low = None if rule.low is None else f"{'above' if rule.open_low else 'of at least'} {rule.low:g}"
    high = None if rule.high is None else f"{'below' if rule.open_high else 'of at most'} {rule.high:g}"
    return " and ".join(b for b in (low, high) if b)


def _device(name: str, value: Any) -> Any:
    """A torch device this machine has: CUDA only with a CUDA GPU, ``cuda:N`` only with N + 1 of them."""
    import torch  # here: the command line starts without torch for the commands that need none

    try:
        device = torch.device(value) if isinstance(value, str) else value
        kind, index = device.type, device.index
    except (RuntimeError, TypeError, AttributeError):
        raise OptionError(f"{name}: {value!r} is not a device; use cpu, cuda or cuda:N") from None
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(
                f"{name}: {str(value)!r} needs a CUDA GPU, and PyTorch finds none on this machine; use --{name} cpu, "
                f"or leave {name} unset (CUDA when there is one, else the CPU)"
            )
        if index is not None and index >= count:
            raise OptionError(
                f"{name}: {str(value)!r} names GPU {index}, but this machine has {count} (0..{count - 1})"
            )
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise OptionError(f"{name}: 'mps' needs Apple's Metal backend, which this machine lacks; use cpu")
    return value


def folder_problem(path: Any, what: str = "the output folder") -> str | None:
    """Why ``path`` cannot be (made) a folder to write in, as the end of one sentence; ``None`` if it can.

    Nothing is created: a file is created and removed in the folder, or in its nearest existing parent
    when it does not exist yet, which also finds what permission bits do not show (a read-only mount,
    ACLs, NFS root squashing).
    """
    folder = Path(str(path)).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        if existing == folder:
            return f"{folder}: {what} is an existing file, not a folder"
        return f"{folder}: {what} is not writable ({existing} is a file, not a folder)"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = "" if existing == folder else f" in {existing}"
        return f"{folder}: {what} is not writable ({reason}{where})"
    return None


def _output_file(name: str, value: Any, rule: Rule) -> str:
    """A file to write: not an existing folder, in a folder that is (or can be made) writable."""
    path = Path(str(value)).absolute()
    if path.is_dir():
        raise OptionError(f"{name}: {path}: {rule.what or 'the output file'} is an existing folder, not a file")
    problem = folder_problem(path.parent, f"the folder of {rule.what or 'the output file'}")
    if problem:
        raise OptionError(f"{name}: {problem}")
    return str(path)


def _datalist(name: str, value: Any) -> str:
    """An existing datalist JSON (``python -m bundle prepare``'s) whose every listed file still exists."""
    path = Path(str(value))
    if not path.is_file():
        raise OptionError(
            f"{name}: {path}: datalist file does not exist (python -m bundle prepare writes one, or pass --dataset_dir)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise OptionError(f"{name}: {path}: not a datalist JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise OptionError(f"{name}: {path}: not a datalist (no 'training' list; python -m bundle prepare writes one)")
    for item in [*data.get("training", []), *data.get("holdout", []), *data.get("testing", [])]:
        files = item.get("image", []) if isinstance(item, dict) else []
        files = [files] if isinstance(files, str) else list(files)
        label = item.get("label") if isinstance(item, dict) else None
        for file in [*files, *([label] if label else [])]:
            if not Path(str(file)).exists():
                raise OptionError(
                    f"{name}: {file}: listed in {path} but does not exist (moved or deleted after prepare?); "
                    "run python -m bundle prepare again"
                )
    return str(path)


def _check_fold(read: Mapping[str, Any]) -> None:
    """``fold`` within the folds: those of the datalist given, else ``num_folds`` (one fold: fold 0)."""
    if read.get("fold") is None:
        return
    folds = read.get("num_folds")
    if read.get("datalist"):
        folds = json.loads(Path(read["datalist"]).read_text()).get("num_folds", folds)
    if folds is not None and read["fold"] >= max(int(folds), 1):
        source = f"the {folds} folds of {read['datalist']}" if read.get("datalist") else f"num_folds {folds}"
        raise OptionError(f"fold: {read['fold']} is outside 0..{max(int(folds), 1) - 1} ({source})")


# -------------------------------------------------------------------------------- flag names


def closest(name: str, known: Sequence[str] | Mapping[str, Any]) -> str | None:
    """The known name closest to ``name`` (a misspelling, a missing or extra letter, a shortening), or ``None``.

    difflib's closest match first; else the one known name that ``name`` begins (``--out`` for ``--output_dir``).
    """
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if matches:
        return matches[0]
    longer = [k for k in known if name and k.startswith(name)]
    return longer[0] if len(longer) == 1 else None


def _suggestion(name: str, known: Sequence[str] | Mapping[str, Any]) -> str:
    near = closest(name, known)
    return f"; did you mean {near}?" if near else ""


#: flags Fire itself reads without its ``--`` separator
FIRE_FLAGS = ("help",)


def check_command_flags(command: str, function: Callable[..., Any], args: Sequence[str]) -> None:
    """Refuse a ``--flag`` that ``function`` does not take, before it runs: one sentence with the closest flag.

    Fire would run the command with the flags it knows and only then stop with "Could not consume arg"
    (exit 2), after all of the work. A function taking ``**overrides`` passes unknown flags on to its
    configs, so only fixed signatures are checked. ``args`` are the command's arguments (after its name);
    Fire's own flags after a lone ``--`` are not the command's. ``--name=value``, ``--name-with-dashes``
    and Fire's ``--noname`` (a boolean set to false) are read as Fire reads them.
    """
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("--") or len(arg) == 2:
            continue  # a value, a negative number or a positional argument
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name in known or name in FIRE_FLAGS or (name.startswith("no") and name[2:] in known):
            continue
        near = closest(name, known)
        listed = ", ".join(f"--{n}" for n in known)
        raise OptionError(
            f"unknown option --{name}; did you mean --{near}?"
            if near
            else f"unknown option --{name}; {command} takes {listed}"
        )


# -------------------------------------------------------------------------------- config keys

#: the arguments of ``monai.bundle run`` (and of the workflow it creates) that are no config key
RUN_ARGUMENTS = (
    "run_id",
    "init_id",
    "final_id",
    "meta_file",
    "config_file",
    "logging_file",
    "tracking",
    "args_file",
    "workflow_name",
    "workflow_type",
    "properties_path",
)


#: keys of earlier versions -> the keys that replaced them (a hint, where the configs have one)
RENAMED_KEYS = {
    "roi_size": ("patch_size", "window"),  # training patch in train.yaml, window in inference.yaml
    "val_roi_size": ("window",),
    "inference_roi_size": ("window",),
    "slice_size": ("patch_size", "window"),
    "train_config": ("config_file",),
}


def check_config_keys(config_files: str | Sequence[str], keys: Sequence[str], where: str | None = None) -> None:
    """Refuse an override key that none of ``config_files`` defines: one sentence with the closest key.

    MONAI's ``ConfigParser.update`` adds an unknown key as a new one, which nothing reads: ``--ttta false``
    ran with TTA, ``--epoch 1`` ran the demo's 40 epochs. A key ``a#b#c`` must exist down to its last
    part; the last part may be new only as an argument of a component (a block with ``_target_``) whose
    callable takes it. Below a reference, an expression or a macro (``@x``, ``$...``, ``%file#x``) the
    structure is only known when the config runs, so such a key is accepted. ``where`` names the configs
    in the sentence (default: the files' names).
    """
    from monai.bundle import ConfigParser

    files = [config_files] if isinstance(config_files, (str, Path)) else list(config_files)
    parser = ConfigParser()
    parser.read_config(f=[str(f) for f in files])
    config = parser.get()
    where = where or " + ".join(_config_name(f) for f in files)
    for key in keys:
        if str(key) in RUN_ARGUMENTS:
            continue
        problem = _key_problem(config, str(key))
        if problem is None:
            continue
        detail, prefix, known = problem
        name = str(key).split("#")[len(prefix)]
        renamed = [k for k in RENAMED_KEYS.get(name, ()) if k in known] if not prefix else []
        near = renamed[0] if renamed else closest(name, known)
        hint = f"; did you mean --{'#'.join([*prefix, near])}?" if near else ""
        raise OptionError(f"--{key}: not a key of {where} ({detail or 'it would be ignored'}){hint}")


def _config_name(path: str | Path) -> str:
    """A config file as the docs name it: relative to the bundle's folder when inside it."""
    from bundle.paths import BUNDLE_ROOT

    path = Path(path).resolve()
    return str(path.relative_to(BUNDLE_ROOT)) if path.is_relative_to(BUNDLE_ROOT) else str(path)


def _key_problem(config: Any, key: str) -> tuple[str, list[str], list[str]] | None:
    """``None`` when ``key`` (``a#b#c``) names something in ``config``, or may; else why not.

    The reason is a clause ("" at the top level), with the parts that matched and the names known where
    matching stopped (for the closest-name hint).
    """
    parts = key.split("#")
    node = config
    for depth, part in enumerate(parts):
        prefix, parent = parts[:depth], "#".join(parts[:depth])
        if isinstance(node, str) and node[:1] in ("@", "$", "%"):
            return None  # resolved when the config runs
        if isinstance(node, Mapping):
            if part in node:
                node = node[part]
                continue
            known = [str(k) for k in node]
            if depth == 0:
                return "", prefix, known
            arguments = _arguments(node.get("_target_"))
            if arguments is None or (depth == len(parts) - 1 and part in arguments):
                return None  # a new argument of a component that takes it, or may
            known += [a for a in arguments if a not in known and not a.startswith("_")]
            return f"{parent} has no key or argument {part!r}", prefix, known
        if isinstance(node, list):
            if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
                node = node[int(part)]
                continue
            return f"{parent} is a list of {len(node)} item(s)", prefix, []
        return f"{parent} is a value, with no keys", prefix, []
    return None


def _arguments(target: Any) -> list[str] | None:
    """The arguments the component ``target`` (a class or function name as configs give it) takes.

    ``None``: it may take any (no component, ``**kwargs`` all the way, or a target that cannot be found
    here: an expression, a name resolved only at run time). A class whose ``__init__`` passes ``**kwargs``
    on is read with its bases' (``M4UNet`` -> ``DynUNet``).
    """
    import pydoc

    from monai.bundle.config_item import ComponentLocator

    if not isinstance(target, str) or target[:1] in ("@", "$", "%"):
        return None
    module = ComponentLocator().get_component_module_name(target)
    component = pydoc.locate(f"{module}.{target}" if isinstance(module, str) else target)
    if component is None:
        return None
    if isinstance(component, type):
        functions = [c.__init__ for c in component.__mro__ if "__init__" in vars(c)]
    else:
        functions = [component]
    names: list[str] = []
    for function in functions:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return None  # no signature (a builtin): the config itself will say
        names += [n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return [n for n in dict.fromkeys(names) if n != "self"]
    return None


def check_command_line_keys(argv: Sequence[str] | None = None) -> None:
    """Under ``python -m monai.bundle run``, refuse a ``--key`` that no config given to it defines.

    A step of each config's ``initialize`` calls this: ``monai.bundle run`` hands the configs no list
    of what the user typed, so the keys are read from ``sys.argv`` (and ``--args_file``) as Fire reads
    them (``--key value``, ``--key=value``, dashes as underscores). Under any other program (a test, a
    notebook, ``python -m bundle``, whose commands check their own ``**overrides``) this does nothing.
    """
    import sys

    argv = list(sys.argv if argv is None else argv)
    if not argv or not _is_monai_bundle_main(argv[0]) or argv[1:2] != ["run"]:
        return
    given = _fire_keywords(argv[2:])
    args_file = given.get("args_file")
    from_file: dict[str, Any] = {}
    if args_file:
        from monai.bundle import ConfigParser

        from_file = dict(ConfigParser.load_config_files(str(args_file)))
    config_file = given.get("config_file", from_file.get("config_file"))
    if not config_file:
        return  # MONAI itself refuses a run without configs
    keys = [k for k in [*given, *from_file] if k not in RUN_ARGUMENTS]
    check_config_keys(config_file, keys)


def _is_monai_bundle_main(program: str) -> bool:
    """Whether ``program`` (``sys.argv[0]``) is ``monai/bundle/__main__.py``, as ``python -m monai.bundle`` runs."""
    import monai.bundle

    path = Path(program)
    return path.name == "__main__.py" and path.resolve().parent == Path(monai.bundle.__file__).resolve().parent


def _fire_keywords(args: Sequence[str]) -> dict[str, Any]:
    """The ``--key value`` pairs of a Fire command line, values parsed as Fire parses them."""
    from fire.parser import DefaultParseValue

    keywords: dict[str, Any] = {}
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            break
        if not arg.startswith("--") or len(arg) == 2:
            continue  # a positional value (the run id) or a negative number
        name, equals, value = arg[2:].partition("=")
        if not equals:
            has_value = index < len(args) and not args[index].startswith("--")
            value = args[index] if has_value else "True"
            index += has_value
        keywords[name.replace("-", "_")] = DefaultParseValue(value)
    return keywords
