"""Boolean options as users type them: one rule (bundle.options.as_bool) through both command lines.

Fire (``python -m bundle`` and ``python -m monai.bundle run``) hands ``--tta false`` over as the
string "false", ``--tta False`` as a bool and ``--tta 0`` as an int. Every boolean key is driven here
through the real Fire parsing of both entry points and the real config resolution, and its effect is
read off the object that uses it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fire
import monai.bundle
import monai.bundle.scripts
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO_ROOT
from monai.bundle import ConfigParser, ConfigWorkflow
from test_inference_config import TINY_NET, _checkpoint

import bundle.atomic
import bundle.constants
import bundle.data.datalist
import bundle.data.io
import bundle.data.labels
import bundle.data.layouts
import bundle.errors
import bundle.evaluation.files
import bundle.evaluation.metrics
import bundle.evaluation.plots
import bundle.evaluation.reports
import bundle.evaluation.statistics
import bundle.inference.run
import bundle.inference.writers
import bundle.integrations.cli
import bundle.integrations.cv
import bundle.integrations.export
import bundle.integrations.monailabel
import bundle.options
import bundle.paths
import bundle.plan.checkpoints
import bundle.plan.recipes
from bundle.errors import OptionError, find_user_error
from bundle.options import as_bool
from bundle.plan.recipes import STEPS

CONFIGS = REPO_ROOT / "configs"
TRUE_SPELLINGS = ["true", "True", "TRUE", "1", "yes", "Yes", "on"]
FALSE_SPELLINGS = ["false", "False", "FALSE", "0", "no", "No", "off"]


@pytest.mark.parametrize("word", TRUE_SPELLINGS)
def test_true_spellings(word: str) -> None:
    assert as_bool(word, "x") is True


@pytest.mark.parametrize("word", FALSE_SPELLINGS)
def test_false_spellings(word: str) -> None:
    assert as_bool(word, "x") is False


@pytest.mark.parametrize("value", [True, False, 1, 0, np.bool_(True), torch.tensor(0)])
def test_bools_ints_and_scalars(value: Any) -> None:
    assert as_bool(value, "x") is bool(value)


@pytest.mark.parametrize("value", ["ture", "", "none", "2", 2, -1, None, 0.5, [True]])
def test_anything_else_is_one_sentence_naming_the_key(value: Any) -> None:
    with pytest.raises(OptionError, match=r"^tta: .* is not a boolean; use one of true/false, yes/no, on/off, 1/0$"):
        as_bool(value, "tta")


#: the words as_bool read before it delegated to monai.utils.str2bool (issue 21): the reference
_OLD_TRUE, _OLD_FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _old_as_bool(word: str) -> bool | None:
    word = word.strip().lower()
    return True if word in _OLD_TRUE else False if word in _OLD_FALSE else None


@pytest.mark.parametrize("word", [*_OLD_TRUE, *_OLD_FALSE])
def test_str2bool_reads_every_word_as_the_old_table_did(word: str) -> None:
    for spelling in (word, word.upper(), word.capitalize(), f"  {word}\t"):
        assert as_bool(spelling, "x") is _old_as_bool(spelling)


def test_str2bool_adds_monais_one_letter_words_and_keeps_the_sentence() -> None:
    assert [as_bool(w, "x") for w in ("t", "Y", "f", "N")] == [True, True, False, False]
    for word in ("tru", "nope", "o", "1.0", "yes please"):
        assert _old_as_bool(word) is None
        with pytest.raises(OptionError, match=r"^x: .* is not a boolean; use one of true/false, yes/no, on/off, 1/0$"):
            as_bool(word, "x")


# ------------------------------------------------------------------ every boolean key of every config


def _config_files() -> list[Path]:
    return sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "variants").glob("*.yaml"))


#: inference.yaml's boolean options of the model's inference recipe: null there ("as the checkpoint's recipe"),
#: read by bundle.plan.recipes.resolve_recipe (with as_bool) when the initialize step evaluates @recipe
RECIPE_FLAGS = {"tta", *STEPS}


def _boolean_keys(path: Path) -> set[str]:
    """Top-level keys whose default is a YAML boolean, plus the computed one (amp) and the recipe's flags."""
    config = yaml.safe_load(path.read_text()) or {}
    keys = {k for k, v in config.items() if isinstance(v, bool) and "#" not in k}  # not nested overrides
    return keys | ({"amp"} & set(config)) | (RECIPE_FLAGS & {k for k, v in config.items() if v is None})


ALL_BOOLEAN_KEYS = sorted(set().union(*(_boolean_keys(p) for p in _config_files())))


def test_the_boolean_keys_found_are_the_documented_ones() -> None:
    assert set(ALL_BOOLEAN_KEYS) == set(PROBES), "a boolean key was added or removed: give it a probe below"


def _checked_keys(path: Path) -> set[str]:
    """The keys an ``initialize`` step of ``path`` checks: ``check_flags`` arguments, and the recipe's options."""
    config = yaml.safe_load(path.read_text()) or {}
    steps = [*config.get("initialize", []), *config.get("+initialize", [])]
    keys = {k for step in steps if isinstance(step, dict) and "check_flags" in str(step.get("_target_")) for k in step}
    recipe = config.get("recipe")
    if isinstance(recipe, dict) and "resolve_recipe" in str(recipe.get("_target_")):
        keys |= set(recipe.get("options", {}))  # read with as_bool when initialize logs the recipe
    return keys - {"_target_"}


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.name)
def test_each_config_checks_its_boolean_keys_before_any_work(path: Path) -> None:
    """In its own ``initialize`` check_flags, or in that of train.yaml / inference.yaml it is merged over.

    How each key is read where it is used (with ``bundle.options.as_bool``, in the factory that uses it)
    is checked by its effect below, through ``monai.bundle run`` with every spelling.
    """
    checked = _checked_keys(path) | _checked_keys(CONFIGS / "train.yaml") | _checked_keys(CONFIGS / "inference.yaml")
    for key in _boolean_keys(path):
        assert key in checked, f"{path.name}: {key} is in no initialize check_flags"


# ------------------------------------------------------------------ what each key changes


def _postprocessing(parser: ConfigParser) -> list[Any]:
    """Inference's post-processing transforms, nested blocks flattened."""
    return list(parser.get_parsed_content("postprocessing").flatten().transforms)


def _postprocessing_flag(name: str) -> Callable[[ConfigParser], bool]:
    """Whether the step ``name`` is in the post-processing (a step that is off is not there)."""

    def probe(parser: ConfigParser) -> bool:
        steps = [t for t in _postprocessing(parser) if type(t).__name__ == name]
        assert len(steps) <= 1
        return bool(steps)

    return probe


def _resume_probe(parser: ConfigParser) -> bool:
    """The resume step of `training`, with a stand-in trainer: true looks for a checkpoint, false does not."""
    parser["train#trainer"] = "$None"
    parser["checkpoint_objects"] = "$None"
    parser["output_dir"] = "/nonexistent/bundle-test-output"  # no checkpoint there
    step = next(i for i, s in enumerate(parser["training"]) if "resume_training" in str(s))
    try:
        parser.get_parsed_content(f"training#{step}")
    except RuntimeError as err:
        assert "checkpoint to resume from" in str(err.__cause__)
        return True
    return False


def _channels_last_probe(parser: ConfigParser) -> bool:
    weight = next(p for p in parser.get_parsed_content("network").parameters() if p.ndim == 5)
    return weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()


def _salient_probe(parser: ConfigParser) -> bool:
    """The preprocessing makes the channel, and the plan (input_channels) says so."""
    parser["network_factory#filters"] = [4, 8, 8, 8, 8, 8]
    parser["device"] = "$torch.device('cpu')"
    steps = {type(t).__name__ for t in parser.get_parsed_content("deterministic_transforms")}
    made = {"SalientMaskd", "ConcatItemsd"} <= steps
    assert made == (parser.get_parsed_content("input_channels")[-1] == "salient")
    return made


M2 = ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m2_resunet_tversky.yaml"]


def _slice_gate_probe(parser: ConfigParser) -> bool:
    """What inference makes of the value the plan records: an M2 segmenter without its gate says so."""
    from bundle.plan.gate import gate_expected

    value = parser.get_parsed_content("model_plan#training#slice_gate")
    network = {"_target_": "bundle.networks.ResUNet", "spatial_dims": 2}
    return gate_expected({"network": network, "output_type": "binary", "training": {"slice_gate": value}})


def _evaluate_flag(name: str) -> Callable[[ConfigParser], bool]:
    """The value scoring reads (with as_bool, as evaluate_datalist does) from what the config hands it."""

    def probe(parser: ConfigParser) -> bool:
        captured: list[dict] = []
        original = bundle.evaluation.reports.evaluate_datalist
        bundle.evaluation.reports.evaluate_datalist = lambda **kwargs: captured.append(kwargs)  # type: ignore[assignment]
        try:
            parser["labelled_cases"] = "$[]"
            parser.get_parsed_content("run#1")
        finally:
            bundle.evaluation.reports.evaluate_datalist = original
        return as_bool(captured[0][name], name)

    return probe


def _overwrite_probe(parser: ConfigParser) -> bool:
    captured: list[dict] = []
    original = bundle.inference.run.cases_to_segment
    bundle.inference.run.cases_to_segment = lambda **kwargs: captured.append(kwargs) or []  # type: ignore[assignment]
    try:
        parser["datalist"] = "$[]"
        parser.get_parsed_content("cases_to_run")
    finally:
        bundle.inference.run.cases_to_segment = original
    return as_bool(captured[0]["overwrite"], "overwrite")


def _validation_step(name: str, configs: tuple[str, ...] = ()) -> Callable[[ConfigParser], bool]:
    """Whether validation's post-processing holds a transform of class ``name``."""

    def probe(parser: ConfigParser) -> bool:
        parser["network_factory#filters"] = [4, 8, 8, 8, 8, 8]
        parser["device"] = "$torch.device('cpu')"
        steps = parser.get_parsed_content("validate#postprocessing").transforms
        return any(type(t).__name__ == name for t in steps)

    return probe


INFERENCE = ["configs/inference.yaml"]
TRAIN = ["configs/train.yaml"]


def _with_min_prob(probe: Callable[[ConfigParser], bool]) -> Callable[[ConfigParser], bool]:
    """``probe`` with the step's number given, so that switching the step on is complete."""

    def with_number(parser: ConfigParser) -> bool:
        if as_bool(parser["remove_unconfident_components"], "remove_unconfident_components"):
            parser["component_min_prob"] = 0.9  # a number for a step that is off is an error of its own
        return probe(parser)

    return with_number


# key -> (configs, probe reading the key's effect from the resolved config)
PROBES: dict[str, tuple[list[str], Callable[[ConfigParser], bool]]] = {
    "tta": (INFERENCE, lambda p: p.get_parsed_content("inferer").inferer.tta),
    "save_uncertainty": (INFERENCE, lambda p: p.get_parsed_content("inferer").inferer.return_std),
    "save_probabilities": (
        INFERENCE,
        lambda p: any(type(t).__name__ == "Invertd" and "pred_mean" in t.keys for t in _postprocessing(p)),
    ),
    "save_seg_nrrd": (
        INFERENCE,
        lambda p: any(getattr(t, "output_ext", "") == ".seg.nrrd" for t in _postprocessing(p)),
    ),
    "mask_outside_brain": (INFERENCE, _postprocessing_flag("OutsideBrainToBackgroundd")),
    "remove_unconfident_components": (INFERENCE, _with_min_prob(_postprocessing_flag("RemoveUnconfidentComponentsd"))),
    "et_components_to_ncr": (INFERENCE, _postprocessing_flag("SmallETComponentsToNCRd")),
    "et_volume_to_ncr": (INFERENCE, _postprocessing_flag("SmallETVolumeToNCRd")),
    "remove_small_components": (INFERENCE, _postprocessing_flag("RemoveSmallTumourComponentsd")),
    "closing": (INFERENCE, _postprocessing_flag("CloseTumourRegionsd")),
    "overwrite": (INFERENCE, _overwrite_probe),
    "amp": (
        TRAIN,
        lambda p: p.get_parsed_content("train#trainer#amp") and p.get_parsed_content("validate#evaluator#amp"),
    ),
    "resume": (TRAIN, _resume_probe),
    "validate_disjoint": (TRAIN, _validation_step("RegionsToDisjointd")),
    "validate_with_recipe": (TRAIN, _validation_step("RegionsToLabelsd")),
    "channels_last": (TRAIN, _channels_last_probe),
    "salient_channel": (TRAIN, _salient_probe),
    "crop_neg_in_brain": (
        TRAIN,
        lambda p: (
            next(
                t
                for t in p.get_parsed_content("train#random_transforms")
                if type(t).__name__ == "RandCropByPosNegLabeld"
            ).image_key
            is not None
        ),
    ),
    "upsample_ds_heads": (TRAIN, lambda p: p.get_parsed_content("network_factory").keywords["upsample_heads"]),
    "skip_empty_slices": (
        ["configs/train.yaml", "configs/train_2d.yaml"],
        lambda p: p.get_parsed_content("train#dataset#skip_empty_slices"),
    ),
    "clahe": (
        ["configs/train.yaml", "configs/train_2d.yaml", "configs/variants/m3_resse_lka_unet.yaml"],
        lambda p: p.get_parsed_content("intensity_transform").get("clahe") is not None,
    ),
    "noise_reduction": (M2, lambda p: p.get_parsed_content("intensity_transform").get("denoise") is not None),
    "slice_gate": (M2, _slice_gate_probe),
    "lesion_wise": (["configs/inference.yaml", "configs/evaluate.yaml"], _evaluate_flag("lesion_wise")),
    "include_disjoint": (["configs/inference.yaml", "configs/evaluate.yaml"], _evaluate_flag("include_disjoint")),
}


def _monai_bundle_run(monkeypatch: pytest.MonkeyPatch, configs: list[str], key: str, word: str) -> ConfigParser:
    """``python -m monai.bundle run --config_file ... --KEY WORD`` up to the workflow, through Fire."""
    made: list[ConfigWorkflow] = []

    class StopError(Exception):
        pass

    def create_workflow(**kwargs: Any) -> ConfigWorkflow:
        made.append(ConfigWorkflow(**kwargs))
        raise StopError

    monkeypatch.setattr(monai.bundle.scripts, "create_workflow", create_workflow)
    files = "[" + ",".join(f"'{REPO_ROOT / c}'" for c in configs) + "]"
    with pytest.raises(StopError):
        fire.Fire({"run": monai.bundle.scripts.run}, command=["run", "--config_file", files, f"--{key}", word])
    return made[0].parser


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inference configs read the network, output type and window from the checkpoint's record."""
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", TINY_NET)


@pytest.mark.parametrize("key", sorted(PROBES))
def test_monai_bundle_run_reads_each_boolean_key_as_typed(
    monkeypatch: pytest.MonkeyPatch, key: str, tiny_checkpoint: Path
) -> None:
    configs, probe = PROBES[key]
    monkeypatch.chdir(REPO_ROOT)
    for words, expected in (([*FALSE_SPELLINGS[:4], "no"], False), ([*TRUE_SPELLINGS[:4], "yes"], True)):
        for word in words:
            parser = _monai_bundle_run(monkeypatch, configs, key, word)
            if "checkpoint" in parser:
                parser["checkpoint"] = str(tiny_checkpoint)
            assert bool(probe(parser)) is expected, f"--{key} {word}"
    parser = _monai_bundle_run(monkeypatch, configs, key, "ture")
    if "checkpoint" in parser:
        parser["checkpoint"] = str(tiny_checkpoint)
    checks = "@recipe" if key in RECIPE_FLAGS else "check_flags"  # the step that reads the key before any work
    flags = next(
        i
        for i, step in enumerate(parser["initialize"])
        if checks in str(step) and (key in str(step) or checks == "@recipe")
    )
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content(f"initialize#{flags}")
    assert str(find_user_error(info.value)).startswith(f"{key}: 'ture' is not a boolean")


# ------------------------------------------------------------------ python -m bundle


class _RecordedError(Exception):
    pass


def _bundle_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> dict[str, Any]:
    """Run ``python -m bundle ARGV`` through Fire up to the ConfigWorkflow it builds; return its settings."""
    seen: dict[str, Any] = {}

    def workflow(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise _RecordedError

    monkeypatch.setattr(monai.bundle, "ConfigWorkflow", workflow)
    with pytest.raises(_RecordedError):
        fire.Fire(bundle.integrations.cli.COMMANDS, command=argv)
    return seen


@pytest.mark.parametrize("flag", ["tta", "save_probabilities", "save_uncertainty", "overwrite"])
def test_bundle_infer_reads_its_flags_as_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: str) -> None:
    for words, expected in ((FALSE_SPELLINGS, False), (TRUE_SPELLINGS, True)):
        for word in words:
            settings = _bundle_cli(monkeypatch, ["infer", str(tmp_path), f"--{flag}", word])
            assert settings[flag] is expected, f"--{flag} {word}"
    with pytest.raises(OptionError, match=rf"^{flag}: 'maybe' is not a boolean"):
        fire.Fire(bundle.integrations.cli.COMMANDS, command=["infer", str(tmp_path), f"--{flag}", "maybe"])


def test_bundle_infer_passes_config_keys_on_for_the_config_to_read(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    settings = _bundle_cli(monkeypatch, ["infer", str(tmp_path), "--closing", "no", "--amp", "False"])
    assert settings["closing"] == "no" and settings["amp"] is False  # read by as_bool in inference.yaml


@pytest.mark.parametrize(
    ("argv", "target", "name"),
    [
        (["prepare", "--dataset_dir", "D", "--skip_bad"], "bundle.data.prepare", "skip_bad"),
        (["export", "--output", "O", "--zip"], "bundle.integrations.export.export", "zip"),
    ],
)
def test_bundle_commands_read_their_flags_as_typed(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], target: str, name: str
) -> None:
    module, function = target.rsplit(".", 1)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(f"{module}.{function}", lambda *a, **kw: calls.append(kw))
    for words, expected in ((FALSE_SPELLINGS, False), (TRUE_SPELLINGS, True)):
        for word in words:
            fire.Fire(bundle.integrations.cli.COMMANDS, command=[*argv, word])
            assert calls.pop()[name] is expected, f"--{name} {word}"
    with pytest.raises(OptionError, match=rf"^{name}: 'ja' is not a boolean"):
        fire.Fire(bundle.integrations.cli.COMMANDS, command=[*argv, "ja"])


@pytest.mark.parametrize("flag", ["lesion_wise", "include_disjoint", "plots"])
def test_bundle_evaluate_reads_its_flags_as_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, flag: str) -> None:
    calls: list[tuple] = []
    monkeypatch.setattr(bundle.evaluation.reports, "check_predictions_exist", lambda *a: None)
    monkeypatch.setattr(bundle.evaluation.reports, "evaluate_folder", lambda *a: calls.append(("evaluate", *a)))
    monkeypatch.setattr(bundle.evaluation.reports, "evaluation_plots", lambda *a: calls.append(("plots",)))
    base = ["evaluate", "--pred", str(tmp_path), "--truth", str(tmp_path)]
    for words, expected in ((FALSE_SPELLINGS, False), (TRUE_SPELLINGS, True)):
        for word in words:
            calls.clear()
            fire.Fire(bundle.integrations.cli.COMMANDS, command=[*base, f"--{flag}", word])
            if flag == "plots":
                assert (("plots",) in calls) is expected, f"--plots {word}"
            else:
                args = calls[0]
                assert args[{"lesion_wise": 6, "include_disjoint": 7}[flag]] is expected, f"--{flag} {word}"
    with pytest.raises(OptionError, match=rf"^{flag}: 'oui' is not a boolean"):
        fire.Fire(bundle.integrations.cli.COMMANDS, command=[*base, f"--{flag}", "oui"])


# ------------------------------------------------------------------ the observed bug, end to end


def _tiny_case_and_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A 24^3 case and a checkpoint of a 3-level DynUNet of train.yaml's family."""
    rng = np.random.default_rng(0)
    case = tmp_path / "Case_000"
    case.mkdir()
    brain = np.zeros((24, 24, 24), np.float32)
    brain[4:20, 4:20, 4:20] = 1
    for modality in ("t1", "t1ce", "t2", "flair"):
        volume = (rng.normal(100, 20, brain.shape) * brain).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), case / f"Case_000_{modality}.nii.gz")
    return case, _checkpoint(tmp_path / "tiny.pt", TINY_NET)


TINY_ARGS = ["--amp", "false"]  # the network and its 16^3 window are the checkpoint's record


@pytest.mark.parametrize("entry", ["bundle", "monai.bundle"])
def test_tta_false_runs_one_pass_through_both_command_lines(tmp_path: Path, entry: str) -> None:
    """The issue's observation: ``--tta false`` ran 8 flips; the uncertainty map (flip std) must be 0."""
    case, checkpoint = _tiny_case_and_checkpoint(tmp_path)
    stds = {}
    for word in ("false", "true"):
        out = tmp_path / f"out_{word}"
        if entry == "bundle":
            args = ["-m", "bundle", "infer", str(case), "--output", str(out)]
        else:
            args = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml"]
            args += ["--dataset_dir", str(case), "--output_dir", str(out)]
        args += ["--checkpoint", str(checkpoint), "--tta", word, "--save_uncertainty", "yes", *TINY_ARGS]
        result = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        stds[word] = float(np.asarray(nib.load(out / "Case_000_uncertainty.nii.gz").dataobj).max())
    assert stds["false"] == 0.0 and stds["true"] > 0.0, stds


@pytest.mark.parametrize("entry", ["bundle", "monai.bundle"])
def test_a_misspelt_boolean_is_one_sentence_before_any_work(tmp_path: Path, entry: str) -> None:
    case, checkpoint = _tiny_case_and_checkpoint(tmp_path)
    out = tmp_path / "out"
    if entry == "bundle":
        args = ["-m", "bundle", "infer", str(case), "--output", str(out), "--closing", "ture"]
    else:
        args = ["-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml", "--dataset_dir", str(case)]
        args += ["--output_dir", str(out), "--closing", "ture"]
    result = subprocess.run(
        [sys.executable, *args, "--checkpoint", str(checkpoint), *TINY_ARGS],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: closing: 'ture' is not a boolean; use one of true/false, yes/no, on/off, 1/0"
    )
    assert not out.exists()


# ------------------------------------------------------------------ every other option, checked before any work


def test_the_table_reads_numbers_words_devices_and_folders(tmp_path: Path) -> None:
    from bundle.options import check_options

    read = check_options(epochs="3", learning_rate=1e-3, cache="disk", device="cpu", output_dir=str(tmp_path / "new"))
    assert read == {
        "epochs": 3,
        "learning_rate": 1e-3,
        "cache": "disk",
        "device": "cpu",
        "output_dir": str(tmp_path / "new"),
    }
    assert not (tmp_path / "new").exists(), "checking a folder makes nothing"
    for values, sentence in [
        ({"epochs": 2.5}, "epochs: 2.5 is not a whole number"),
        ({"epochs": True}, "epochs: True is not a whole number"),
        ({"learning_rate": float("nan")}, "learning_rate: nan is not a number"),
        ({"holdout_fraction": 1.0}, "holdout_fraction: 1.0 is not allowed: use a number of at least 0 and below 1"),
        ({"cache": "memmory"}, "cache: 'memmory' is not one of memory, disk, none; did you mean memory?"),
        ({"device": "gpu"}, "device: 'gpu' is not a device; use cpu, cuda or cuda:N"),
        ({"epochs": None}, "epochs: None is not set"),
        ({"epocs": 3}, "epocs: no rule for this option in bundle.options.OPTIONS; did you mean epochs?"),
    ]:
        with pytest.raises(OptionError) as info:
            check_options(**values)
        assert str(info.value) == sentence


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """``python -m bundle ARGV`` in-process (bundle.integrations.cli.main): the one sentence it ends with, exit 1."""
    monkeypatch.setattr(sys, "argv", ["bundle", *argv])
    with pytest.raises(SystemExit) as info:
        bundle.integrations.cli.main()
    if isinstance(info.value.code, str):  # SystemExit("error: ...") of the commands' _user_errors
        return info.value.code
    assert info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def read_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A folder on a "read-only file system": creating a file in it fails with EROFS, as on a read-only mount.

    (Root ignores permission bits, so a chmod would not do; tests/test_write_faults.py mounts a real one.)
    """
    import errno
    import tempfile

    folder = tmp_path / "read_only"
    folder.mkdir()
    mkstemp = tempfile.mkstemp

    def refusing(*args: Any, **kwargs: Any) -> Any:
        if Path(str(kwargs.get("dir", ""))).resolve() == folder.resolve():
            raise OSError(errno.EROFS, "Read-only file system")
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(bundle.options.tempfile, "mkstemp", refusing)
    return folder


def _demo_dataset(tmp_path: Path) -> Path:
    from conftest import write_brats_case

    root = tmp_path / "data"
    for i in range(4):
        write_brats_case(root, f"BraTS2021_{i:05d}", "brats2021")
    return root


def test_python_m_bundle_stops_before_any_work_with_one_sentence(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, read_only: Path
) -> None:
    """Each probe of issue 20 through the command line; no command function's work starts (the calls are recorded)."""
    data = _demo_dataset(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    work: list[str] = []
    monkeypatch.setattr("bundle.data.prepare", lambda *a, **k: work.append("prepare"))
    monkeypatch.setattr("bundle.evaluation.statistics.compare", lambda *a, **k: work.append("compare"))
    monkeypatch.setattr("bundle.integrations.export.export", lambda *a, **k: work.append("export"))
    monkeypatch.setattr("bundle.integrations.cv.run_cv", lambda *a, **k: work.append("cv"))
    monkeypatch.setattr("bundle.evaluation.plots.plot_training_curves", lambda *a, **k: work.append("plots"))
    monkeypatch.setattr("monai.bundle.ConfigWorkflow", lambda *a, **k: work.append("demo"))
    prepare = ["prepare", "--dataset_dir", str(data), "--output", str(tmp_path / "datalist.json")]
    compare = ["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]
    probes = {
        (*prepare, "--fold", "3"): "unknown option --fold; did you mean --folds?",
        (*compare, "--metric", "dice"): "unknown option --metric; did you mean --metrics?",
        (*prepare, "--folds", "0"): "folds: 0 is not allowed: use a whole number of at least 1",
        (*prepare[:-1], str(tmp_path)): f"output: {tmp_path}: the datalist file is an existing folder, not a file",
        (*prepare[:-1], str(read_only / "d.json")): (
            f"output: {read_only}: the folder of the datalist file is not writable (Read-only file system)"
        ),
        (*compare, "--n_bootstrap", "0"): "n_bootstrap: 0 is not allowed: use a whole number of at least 1",
        ("demo", "--epochs", "abc"): "epochs: 'abc' is not a whole number",
        (
            "demo",
            "--output_dir",
            str(a_file),
        ): f"output_dir: {a_file}: the output folder is an existing file, not a folder",
        ("demo", "--output_dir", str(read_only / "demo")): (
            f"output_dir: {read_only / 'demo'}: the output folder is not writable "
            f"(Read-only file system in {read_only})"
        ),
        ("export", "--output", str(tmp_path / "zoo"), "--chekpoint", "m.pt"): (
            "unknown option --chekpoint; did you mean --checkpoint?"
        ),
        ("cv", "--folds", "1", "--dataset_dir", str(data)): (
            "folds: 1 is not allowed: use a whole number of at least 2; cross-validation needs 2 folds or more "
            "(with one, a model is scored on the cases it trained on)"
        ),
        ("cv", "--folds", "0", "--dataset_dir", str(data)): "folds: 0 is not allowed: use a whole number of at least 2",
        ("plots", str(tmp_path), "--metrc", "dice"): "unknown option --metrc; did you mean --metric?",
        ("plots", str(tmp_path), "--out", "x"): "unknown option --out; did you mean --output_dir?",
    }
    for argv, sentence in probes.items():
        message = _main(monkeypatch, capsys, list(argv))
        assert message.startswith(f"error: {sentence}"), (argv, message)
        assert not work, f"{argv}: {work} ran before the option was refused"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "data", "read_only"], "nothing was written"
    assert not any(read_only.iterdir())


def test_export_checks_its_output_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, read_only: Path
) -> None:
    """A file or a read-only folder as --output: refused before the checkpoint is read (it is not one here)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    not_read = tmp_path / "not_a_checkpoint.pt"
    not_read.write_text("never read")
    for output, sentence in (
        (a_file, f"--output {a_file}: is a file or a link, not a folder; choose a new folder"),
        (
            read_only / "zoo",
            f"--output {read_only / 'zoo'}: {read_only}: the folder of the export is not writable "
            "(Read-only file system)",
        ),
    ):
        message = _main(monkeypatch, capsys, ["export", "--output", str(output), "--checkpoint", str(not_read)])
        assert message == f"error: {sentence}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "not_a_checkpoint.pt", "read_only"]
    assert not any(read_only.iterdir())


def test_flags_fire_reads_its_own_way_are_known() -> None:
    """``--name=value``, dashes for underscores, ``--noname`` (false), Fire's ``--help`` and its flags after ``--``."""
    from bundle.options import check_command_flags

    def command(dataset_dir: str, skip_bad: bool = False, n_bootstrap: int = 1) -> None:
        """A fixed signature."""

    for args in (["--dataset_dir=D"], ["--n-bootstrap", "5"], ["--noskip_bad"], ["--help"], ["--", "--trace"]):
        check_command_flags("command", command, args)
    check_command_flags("command", command, ["--dataset_dir", "--fold"][1:][:0])  # values are not flags
    with pytest.raises(OptionError, match=r"^unknown option --skip; did you mean --skip_bad\?$"):
        check_command_flags("command", command, ["--skip"])
    with pytest.raises(OptionError, match=r"^unknown option --zzz; command takes --dataset_dir, --skip_bad, --n_boot"):
        check_command_flags("command", command, ["D", "--zzz", "1"])
    check_command_flags(
        "infer", bundle.integrations.cli.infer, ["CASE", "--closing", "no"]
    )  # **overrides: the config's


def test_compare_refuses_a_file_that_is_no_metrics_table_and_a_misspelt_metric(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    table = tmp_path / "metrics.csv"
    table.write_text("case,region,dice,hd95\nc1,WT,0.8,3.0\nc2,WT,0.7,4.0\nc3,WT,0.9,2.0\n")
    binary = tmp_path / "model.csv"
    binary.write_bytes(bytes(range(256)) * 4)  # e.g. a checkpoint given by mistake
    message = _main(monkeypatch, capsys, ["compare", str(binary), str(table)])
    assert message == f"error: {binary}: not a metrics table (not CSV text: UnicodeDecodeError)"
    message = _main(monkeypatch, capsys, ["compare", str(table), str(table), "--metrics", "dcie"])
    assert message == f"error: metrics: 'dcie' is not a column of {table}; did you mean dice?"
    other = tmp_path / "other.csv"
    other.write_text("epoch,loss\n1,0.5\n")
    message = _main(monkeypatch, capsys, ["compare", str(other), str(table)])
    assert message.startswith(f"error: {other}: not a metrics table (expected the columns 'case' and 'region'")
    monkeypatch.setattr(sys, "argv", ["bundle", "compare", str(table), str(table), "--metrics", "dice,hd95"])
    bundle.integrations.cli.main()
    assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:-1]] == [["WT", "dice"], ["WT", "hd95"]]


TRAINING_PROBES = {
    "epochs 0": ({"epochs": 0}, "epochs: 0 is not allowed: use a whole number of at least 1"),
    "batch_size 0": ({"batch_size": 0}, "batch_size: 0 is not allowed: use a whole number of at least 1"),
    "batch_size -1": ({"batch_size": -1}, "batch_size: -1 is not allowed: use a whole number of at least 1"),
    "negative learning_rate": (
        {"learning_rate": -1e-4},
        "learning_rate: -0.0001 is not allowed: use a number of at least 0",
    ),
    "cache ram": ({"cache": "ram"}, "cache: 'ram' is not one of memory, disk, none"),
    "output_dir a file": (
        {"output_dir": "A_FILE"},
        "output_dir: A_FILE: the output folder is an existing file, not a folder",
    ),
    "output_dir read-only": (
        {"output_dir": "READ_ONLY/out"},
        "output_dir: READ_ONLY/out: the output folder is not writable (Read-only file system in READ_ONLY)",
    ),
    "datalist missing": (
        {"datalist": "MISSING"},
        "datalist: MISSING: datalist file does not exist (python -m bundle prepare writes one, or pass --dataset_dir)",
    ),
    "a listed file deleted after prepare": (
        {"datalist": "DATALIST"},
        "datalist: DELETED: listed in DATALIST but does not exist (moved or deleted after prepare?); "
        "run python -m bundle prepare again",
    ),
    "patch not a multiple of the network's down-sampling": (
        {"patch_size": [100, 100, 100]},
        "patch_size: [100, 100, 100] is not a multiple of [32, 32, 32] per side, the down-sampling of the network "
        "(M4UNet); e.g. [128, 128, 128]",
    ),
    "window not a multiple of the network's down-sampling": (
        {"window": [96, 96, 80]},
        "window: [96, 96, 80] is not a multiple of [32, 32, 32] per side, the down-sampling of the network "
        "(M4UNet); e.g. [96, 96, 96]",
    ),
    "fold outside the datalist's folds": (
        {"datalist": "DATALIST", "fold": 2},
        "fold: 2 is outside 0..1 (the 2 folds of DATALIST)",
    ),
}
if not torch.cuda.is_available():
    TRAINING_PROBES["device cuda without CUDA"] = (
        {"device": "cuda"},
        "device: 'cuda' needs a CUDA GPU, and PyTorch finds none on this machine; use --device cpu, or leave device "
        "unset (CUDA when there is one, else the CPU)",
    )


@pytest.mark.parametrize("probe", sorted(TRAINING_PROBES))
def test_monai_bundle_run_training_checks_every_option_before_any_work(
    tmp_path: Path, read_only: Path, monkeypatch: pytest.MonkeyPatch, probe: str
) -> None:
    """``monai.bundle run training`` (in-process, as the command runs it): the sentence before any case is read."""
    from bundle.data import prepare

    monkeypatch.chdir(REPO_ROOT)
    data = _demo_dataset(tmp_path)
    datalist = prepare(str(data), str(tmp_path / "datalist.json"), folds=2)
    deleted = data / "BraTS2021_00002" / "BraTS2021_00002_t2.nii.gz"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    names = {"A_FILE": a_file, "READ_ONLY": read_only, "MISSING": tmp_path / "gone.json", "DATALIST": datalist}
    names["DELETED"] = deleted
    overrides, sentence = TRAINING_PROBES[probe]
    overrides = {k: str(names.get(v, v)) if isinstance(v, str) else v for k, v in overrides.items()}
    for name, path in names.items():
        overrides = {k: v.replace(name, str(path)) if isinstance(v, str) else v for k, v in overrides.items()}
        sentence = sentence.replace(name, str(path))
    if probe == "a listed file deleted after prepare":
        deleted.unlink()
    checked: list[str] = []
    monkeypatch.setattr("bundle.data.datalist.check_cases", lambda *a, **k: checked.append("case checks") or [])
    out, models = tmp_path / "out", tmp_path / "models"
    settings = {"dataset_dir": str(data), "output_dir": str(out), "ckpt_dir": str(models), "num_folds": 2}
    with pytest.raises(Exception) as info:
        monai.bundle.scripts.run("training", config_file=str(CONFIGS / "train.yaml"), **{**settings, **overrides})
    error = find_user_error(info.value)
    assert isinstance(error, OptionError), repr(info.value)
    assert str(error) == sentence
    assert not checked, "a case was read before the option was refused"
    assert not out.exists() and not models.exists()


def test_monai_bundle_run_training_ends_with_the_options_sentence(tmp_path: Path) -> None:
    """The whole command: exit code 1, the sentence as the last line, no traceback, no folder."""
    out = tmp_path / "out"
    args = ["-m", "monai.bundle", "run", "training", "--config_file", "configs/train.yaml", "--cache", "ram"]
    result = subprocess.run(
        [sys.executable, *args, "--dataset_dir", str(tmp_path), "--output_dir", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "error: cache: 'ram' is not one of memory, disk, none"
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_sentence_for_inference_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """README's ``--device cuda``: python -m bundle infer and the config's initialize (monai.bundle run)."""
    case, checkpoint = _tiny_case_and_checkpoint(tmp_path)
    sentence = "device: 'cuda' needs a CUDA GPU, and PyTorch finds none on this machine"
    message = _main(monkeypatch, capsys, ["infer", str(case), "--output", str(tmp_path / "out"), "--device", "cuda"])
    assert message.startswith(f"error: {sentence}")
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(Exception) as info:
        monai.bundle.scripts.run(
            config_file=str(CONFIGS / "inference.yaml"),
            dataset_dir=str(case),
            output_dir=str(tmp_path / "out"),
            checkpoint=str(checkpoint),
            device="cuda",
        )
    assert str(find_user_error(info.value)).startswith(sentence)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ unknown config keys, with the closest one


@pytest.mark.parametrize(
    ("configs", "key", "sentence"),
    [
        (
            ["inference.yaml"],
            "ttta",
            "--ttta: not a key of configs/inference.yaml (it would be ignored); did you mean --tta?",
        ),
        (
            ["train.yaml", "demo.yaml"],
            "epoch",
            "--epoch: not a key of configs/train.yaml + configs/demo.yaml (it would be ignored);"
            " did you mean --epochs?",
        ),
        (["train.yaml"], "tta", "--tta: not a key of configs/train.yaml (it would be ignored)"),
        (
            ["train.yaml"],
            "loss_factory#loss#lamda_dice",
            "--loss_factory#loss#lamda_dice: not a key of configs/train.yaml (loss_factory#loss has no key or"
            " argument 'lamda_dice'); did you mean --loss_factory#loss#lambda_dice?",
        ),
        (
            ["train.yaml"],
            "network_factory#dropuot",
            "--network_factory#dropuot: not a key of configs/train.yaml (network_factory has no key or argument"
            " 'dropuot'); did you mean --network_factory#dropout?",
        ),
        (
            ["train.yaml"],
            "optimizer_factory#momentum",
            "--optimizer_factory#momentum: not a key of configs/train.yaml"
            " (optimizer_factory has no key or argument 'momentum')",
        ),
        (
            ["train.yaml"],
            "patch_size#3",
            "--patch_size#3: not a key of configs/train.yaml (patch_size is a list of 3 item(s))",
        ),
        (
            ["train.yaml"],
            "epochs#max",
            "--epochs#max: not a key of configs/train.yaml (epochs is a value, with no keys)",
        ),
    ],
)
def test_a_key_no_config_defines_is_one_sentence_with_the_closest(configs: list[str], key: str, sentence: str) -> None:
    with pytest.raises(OptionError) as info:
        bundle.options.check_config_keys([str(CONFIGS / name) for name in configs], [key])
    assert str(info.value) == sentence


@pytest.mark.parametrize(
    ("configs", "key"),
    [
        (["inference.yaml"], "tta"),
        (["train.yaml"], "epochs"),
        (["train.yaml"], "patch_size#0"),
        (["train.yaml"], "loss_factory#loss#lambda_dice"),  # an existing argument
        (["train.yaml"], "network_factory#dropout"),  # a new argument M4UNet passes on to DynUNet
        (["train.yaml"], "optimizer_factory#amsgrad"),  # a new argument of torch.optim.Adam
        (["train.yaml"], "intensity_transform#zscore#nonzero"),
        (["train.yaml", "variants/m3_resse_lka_unet.yaml"], "clahe"),  # a variant's own key
        (["train.yaml", "train_2d.yaml"], "slices_per_volume"),
        (["inference.yaml", "evaluate.yaml"], "lesion_wise"),
        (["train.yaml"], "config_file"),  # monai.bundle run's own arguments
    ],
)
def test_keys_the_configs_define_or_their_components_take_pass(configs: list[str], key: str) -> None:
    bundle.options.check_config_keys([str(CONFIGS / name) for name in configs], [key])


def test_monai_bundle_run_command_line_keys_are_read_as_fire_reads_them(tmp_path: Path) -> None:
    """sys.argv of ``python -m monai.bundle run``: ``--k v``, ``--k=v``, dashes, ``--args_file``; elsewhere nothing."""
    main = str(Path(monai.bundle.__file__).parent / "__main__.py")
    files = "['configs/train.yaml','configs/demo.yaml']"
    check = bundle.options.check_command_line_keys
    with pytest.raises(OptionError, match=r"^--epoch: .*did you mean --epochs\?$"):
        check([main, "run", "training", "--config_file", files, "--epoch", "1"])
    with pytest.raises(OptionError, match=r"^--epoch: "):
        check([main, "run", "training", f"--config_file={files}", "--epoch=1"])
    with pytest.raises(OptionError, match=r"^--ttta: .*did you mean --tta\?$"):
        check([main, "run", "--config-file", "configs/inference.yaml", "--amp", "--ttta", "false"])
    check([main, "run", "training", "--config_file", files, "--epochs", "1", "--val-interval", "2", "--amp"])
    args_file = tmp_path / "args.yaml"
    args_file.write_text(f"config_file: {files}\nepohcs: 3\n")
    with pytest.raises(OptionError, match=r"^--epohcs: .*did you mean --epochs\?$"):
        check([main, "run", "training", "--args_file", str(args_file)])
    check(["pytest", "run", "--config_file", files, "--epoch", "1"])  # not monai.bundle: its caller checks


EPOCH_SENTENCE = (
    "--epoch: not a key of configs/train.yaml + configs/demo.yaml (it would be ignored); did you mean --epochs?"
)


def test_unknown_keys_stop_every_command_before_any_work(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """``--ttta false`` ran with TTA and ``--epoch 1`` the demo's 40 epochs: now one sentence, nothing made."""
    case, checkpoint = _tiny_case_and_checkpoint(tmp_path)
    out = tmp_path / "out"
    infer = ["infer", str(case), "--output", str(out), "--checkpoint", str(checkpoint), "--ttta", "false"]
    assert _main(monkeypatch, capsys, infer) == (
        "error: --ttta: not a key of configs/inference.yaml (it would be ignored); did you mean --tta?"
    )
    evaluate = ["evaluate", "--truth", str(case.parent), "--checkpoint", str(checkpoint), "--output_dir", str(out)]
    assert _main(monkeypatch, capsys, [*evaluate, "--lesion-wsie", "false"]).startswith(
        "error: --lesion_wsie: not a key of configs/inference.yaml + configs/evaluate.yaml (it would be ignored);"
        " did you mean --lesion_wise?"
    )
    demo = "['configs/train.yaml','configs/demo.yaml']"
    train = ["train", "--config_file", demo, "--output_dir", str(out), "--epoch", "1"]
    sentence = "error: " + EPOCH_SENTENCE
    assert _main(monkeypatch, capsys, train) == sentence
    cv = ["cv", "--config_file", demo, "--folds", "2", "--dataset_dir", str(case.parent), "--output_dir", str(out)]
    assert _main(monkeypatch, capsys, [*cv, "--epoch", "1"]) == sentence
    assert not out.exists()


def test_monai_bundle_run_stops_on_an_unknown_key_with_one_sentence(tmp_path: Path) -> None:
    """The whole command as users type it: exit 1, the sentence last, no traceback, no folder."""
    out = tmp_path / "out"
    args = ["-m", "monai.bundle", "run", "training", "--config_file", "['configs/train.yaml','configs/demo.yaml']"]
    result = subprocess.run(
        [sys.executable, *args, "--output_dir", str(out), "--epoch", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == ("error: " + EPOCH_SENTENCE)
    assert not out.exists()
