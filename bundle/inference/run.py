"""Inference runs: input and option checks, and the ``infer`` function behind ``python -m bundle infer``.

``configs/inference.yaml`` is the one inference pipeline; :func:`infer` runs that same config through
MONAI's ``ConfigWorkflow``, exactly as ``python -m monai.bundle run --config_file configs/inference.yaml``
does, only with the command line's arguments as overrides; a training variant given as ``--config_file``
contributes its inference recipe (:mod:`bundle.plan.recipes`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.data import Dataset

from bundle.atomic import remove_stale_temporaries
from bundle.data import file_list, read_voxels
from bundle.data.labels import INTERNAL, scheme_values
from bundle.errors import DataError, OptionError, find_user_error
from bundle.inference.writers import AtomicSaveImaged
from bundle.options import as_bool, folder_problem
from bundle.paths import BUNDLE_ROOT, output_path, resolve_config_files, working_directory
from bundle.plan.checkpoints import model_state, read_record, spatial_dims
from bundle.plan.recipes import RULE_KEYS, STEPS

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ inputs


class InferenceDataset(Dataset):
    """MONAI ``Dataset`` whose load errors name the file in one sentence.

    The headers were checked up front (:func:`bundle.data.select_cases`); what remains is data that
    cannot be decompressed or decoded (a truncated ``.nii.gz``). MONAI's transform chain would
    report it as a nested "applying transform" trace without the file name.
    """

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as err:
            item = self.data[index]
            raise DataError(f"{_unreadable_file(item)}: cannot be read ({_root_cause(err)})") from err


def _unreadable_file(item: Mapping[str, Any]) -> str:
    """The first of the item's image files whose voxel data cannot be read (or all of them)."""
    files = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
    for path in files:
        try:
            read_voxels(path)
        except DataError:
            return str(path)
    return ", ".join(str(f) for f in files)


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}".splitlines()[0]


def check_checkpoint(checkpoint: str, network: torch.nn.Module) -> str:
    """Raise one sentence naming ``checkpoint`` if it is missing, unreadable or does not fit ``network``.

    The network is normally the one the checkpoint records (:mod:`bundle.plan.checkpoints`), so a
    mismatch means ``network_def`` was overridden. MONAI's ``CheckpointLoader`` would fail later,
    inside the run, with PyTorch's multi-line ``load_state_dict`` report; this check runs in
    ``initialize``, before any case is loaded.
    """
    path = Path(checkpoint)
    state = model_state(path)
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        raise DataError(
            f"{path}: checkpoint does not match the network ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(shapes)} differently shaped weights, e.g. {first!r}); it records "
            f"{read_record(path)['network']['_target_']}: leave network_def unset to use the network it records"
        )
    return str(path)


# ------------------------------------------------------------------------------------- the recipe


def output_label_scheme(scheme: str | None, output_type: str) -> str:
    """The label values written: ``scheme``, or by default BraTS 2021's, and 0/1 for a binary model.

    A binary (whole-tumour) model's mask has no NCR, ED or ET to map onto a dataset's values, so a
    scheme other than ``internal`` for it is an error rather than a silently different file.
    """
    if scheme is None:
        return INTERNAL if output_type == "binary" else "brats2021"
    try:
        scheme_values(str(scheme))
    except ValueError as err:
        raise OptionError(f"output_label_scheme: {err}") from None
    if output_type == "binary" and scheme != INTERNAL:
        raise OptionError(
            f"output_label_scheme: {scheme!r} maps NCR, ED and ET, but this binary model writes a whole-tumour "
            "mask (0/1); leave it unset or use internal"
        )
    return str(scheme)


def gate_decision_threshold(gate_threshold: float | None, default: float = 0.5) -> float:
    """The probability from which M2's gate passes a slice: ``gate_threshold``, or ``default`` when it is ``None``."""
    return default if gate_threshold is None else gate_threshold


def log_recipe(
    recipe: Mapping[str, Any],
    record: Mapping[str, Any],
    checkpoint: str,
    gate_checkpoint: str | None = None,
    label_scheme: str = "brats2021",
    gate_threshold: float | None = None,
    gate_default_threshold: float = 0.5,
) -> dict[str, Any]:
    """Log in one line what this run does to each case, and in another M2's gate when one is given.

    An ``initialize`` step: evaluating ``recipe`` there checks every option before any case is read. A
    gate given for a 3-D model, a gate threshold outside [0, 1], or a gate threshold without a gate
    (it would be ignored) is an error.
    """
    dims = spatial_dims(record)
    if gate_checkpoint and dims != 2:
        raise OptionError(
            f"gate_checkpoint: {gate_checkpoint} gates the slices of a 2-D model; {checkpoint} holds a 3-D model"
        )
    if gate_threshold is not None and not gate_checkpoint:
        raise OptionError(
            f"gate_threshold: {gate_threshold} is given without gate_checkpoint; it applies to M2's slice gate only"
        )
    gate_threshold = gate_decision_threshold(gate_threshold, gate_default_threshold)
    if gate_checkpoint:
        if isinstance(gate_threshold, bool) or not isinstance(gate_threshold, (int, float)):
            raise OptionError(f"gate_threshold: {gate_threshold!r} is not a probability (a number in [0, 1])")
        if not 0.0 <= gate_threshold <= 1.0:
            raise OptionError(f"gate_threshold: {gate_threshold} is not a probability (a number in [0, 1])")
        logger.info(
            "gate: %s, threshold %g: the segmenter runs on the slices whose P(tumour) is at least %g, "
            "the others get an empty mask",
            gate_checkpoint,
            gate_threshold,
            gate_threshold,
        )
    rule = {"regions": "thresholds", "binary": "mask threshold", "classes": "argmax"}[record["output_type"]]
    numbers = [f"{key} {recipe[key]}" for key in RULE_KEYS[record["output_type"]]]
    logger.info(
        "%s: %s %s model, %s, %s%s, post-processing: %s; labels as %s; preprocessing of %s",
        checkpoint,
        f"{dims}-D",
        record["output_type"],
        "flip TTA" if recipe["tta"] else "one pass",
        rule,
        f" ({', '.join(numbers)})" if numbers else "",
        ", ".join(step for step in STEPS if recipe[step]) or "none",
        label_scheme,
        ", ".join(recipe["train_config"]),
    )
    return dict(recipe)


def variant_recipe(config_file: str | Path) -> dict[str, Any]:
    """The ``inference_recipe`` block a training config file (a variant) gives its models.

    ``python -m bundle infer --config_file configs/variants/X.yaml`` runs that method's recipe; a
    variant without its own block trains (and so infers) with ``configs/train.yaml``'s. A recipe is
    plain values, so the block is read from the file as it is: merging a variant into a config stack
    would need the rest of its stack (a 2-D variant overrides ids of ``configs/train_2d.yaml``).
    """
    for path in resolve_config_files([str(config_file), "configs/train.yaml"]):
        content = yaml.safe_load(Path(path).read_text()) or {}
        if "inference_recipe" in content:
            recipe = content["inference_recipe"]
            if not isinstance(recipe, Mapping):
                raise OptionError(f"{path}: inference_recipe is not a block of keys")
            return dict(recipe)
    raise OptionError(f"{config_file}: no inference_recipe, and configs/train.yaml has none either")


def _is_training_config(path: str) -> bool:
    """A training variant (it has a ``network_factory`` or an ``inference_recipe``), not an inference overlay."""
    content = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(content, Mapping):
        return False
    return "network_factory" in content or isinstance(content.get("inference_recipe"), Mapping)


# ----------------------------------------------------------------------------------------- outputs


def check_output_dir(output_dir: str | Path) -> str:
    """Raise one sentence naming ``output_dir`` unless it is, or can be made, a folder one can write in.

    Runs first in ``initialize``, before the model is loaded or any case is read: otherwise the first
    write fails only after the first case has been segmented, with MONAI's writer traceback. Nothing
    is created (the folder is made once every check passed; :func:`bundle.options.folder_problem`).
    """
    problem = folder_problem(output_dir, "the output folder")
    if problem:
        raise DataError(problem)
    return str(Path(output_dir).absolute())


def _transforms(transform: Any) -> Iterator[Any]:
    """``transform`` and, for a ``Compose`` or a list, every transform inside it, depth first."""
    if isinstance(transform, (list, tuple)):
        for t in transform:
            yield from _transforms(t)
        return
    yield transform
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, (list, tuple)):
        yield from _transforms(inner)


def cases_to_segment(
    datalist: Sequence[Mapping[str, Any]], postprocessing: Any, overwrite: bool = False
) -> list[dict[str, Any]]:
    """The datalist items still to segment: all with ``overwrite``, else those missing an output.

    The outputs of a case are those every :class:`AtomicSaveImaged` in ``postprocessing`` would
    write (``<case>_seg.nii.gz``, and ``_prob`` / ``_uncertainty`` when asked for), so "done" always
    means what the run itself would produce. A case is done when all exist under their final names:
    :class:`AtomicSaveImaged` only renames a complete file to such a name, and its temporary files
    are hidden and named differently, so a killed run leaves at most an incomplete case, which is
    redone. Skipped cases are logged, one line each and a count. The temporary files that killed runs
    left in the output folders are removed first (only the bundle's own, of processes no longer running).
    """
    savers = [t for t in _transforms(postprocessing) if isinstance(t, AtomicSaveImaged)]
    for folder in sorted({s.output_dir for s in savers}):
        remove_stale_temporaries(folder)  # what killed runs left there, theirs only (bundle.atomic)
    todo = []
    for item in datalist:
        outputs = [saver.final_path(item) for saver in savers]
        if overwrite or not outputs or not all(p.is_file() for p in outputs):
            todo.append(dict(item))
        else:
            name = item.get("case_id") or outputs[0].name
            logger.info("skipping %s: %s already written", name, ", ".join(p.name for p in outputs))
    skipped = len(datalist) - len(todo)
    if skipped:
        logger.info(
            "%d of %d case(s) already segmented in %s, skipped (--overwrite true redoes them); %d to segment",
            skipped,
            len(datalist),
            ", ".join(sorted({str(s.output_dir) for s in savers})),
            len(todo),
        )
    return todo


# ------------------------------------------------------------------------------------------- CLI


def infer(
    input: str | Sequence[str],
    output: str = "runs/inference",
    checkpoint: str | None = None,
    tta: bool | str | None = None,
    device: str | None = None,
    save_probabilities: bool = False,
    save_uncertainty: bool = False,
    layout: str | None = None,
    overwrite: bool | str | None = None,
    config_file: str | Sequence[str] | None = None,
    **overrides: Any,
) -> list[str]:
    """Segment a case folder, a dataset folder or explicit files with ``configs/inference.yaml``.

    The checkpoint's model record says how: its network, window or slice size, preprocessing and its
    method's inference recipe (:mod:`bundle.plan.recipes`); ``tta``, any other recipe key in
    ``overrides`` and a variant in ``config_file`` override the recipe.

    Args:
        input: a dataset folder (BraTS 2021 / 2023 / MSD), one case folder, or the files of one case
            (four volumes T1, T1ce, T2, FLAIR, or one 4-D image), as a list or one ``"[a,b,c,d]"`` string.
        output: folder for ``<case>_seg.nii.gz`` (and ``_prob`` / ``_uncertainty``).
        checkpoint: model weights, default ``models/model.pt`` of the bundle.
        tta: flip test-time augmentation on or off; ``None``: as the recipe says (M4 on, M1-M3 off).
        device: ``"cuda"``, ``"cpu"``...; default CUDA when available.
        save_probabilities: also write the averaged probability maps.
        save_uncertainty: also write the per-voxel std across flips.
        layout: force a dataset layout (``brats2021``, ``brats2023``, ``msd``).
        overwrite: redo cases whose outputs already exist; ``False`` skips them, so rerunning a
            killed batch run continues it. ``None``: the config's ``overwrite`` (``False`` in
            ``inference.yaml``, ``True`` in ``evaluate.yaml``).
        config_file: the inference configs (default ``configs/inference.yaml``, which is added when
            only other files are given); a training variant among them (a file with its own
            ``network_factory`` or ``inference_recipe``, e.g. ``configs/variants/m3_resse_lka_unet.yaml``)
            gives its inference recipe instead of the checkpoint's.
        overrides: any other top-level config key (``roi_size``, ``closing``, ``output_label_scheme``, ...).

    Returns:
        The segmentation file of every case, the ones written now and the ones skipped as done.
    """
    from monai.bundle import ConfigWorkflow

    inputs = file_list(str(input)) if isinstance(input, (str, Path)) else [str(i) for i in input]
    inputs = [str(Path(i).resolve()) for i in inputs]
    is_folder = len(inputs) == 1 and Path(inputs[0]).is_dir()
    settings: dict[str, Any] = {
        "dataset_dir": inputs[0] if is_folder else None,
        "input_files": None if is_folder else inputs,
        "output_dir": str(Path(output).resolve()),
        "save_probabilities": as_bool(save_probabilities, "save_probabilities"),
        "save_uncertainty": as_bool(save_uncertainty, "save_uncertainty"),
        "layout": layout,
    }
    if tta is not None:
        settings["tta"] = as_bool(tta, "tta")
    if overwrite is not None:
        settings["overwrite"] = as_bool(overwrite, "overwrite")
    if checkpoint is not None:
        settings["checkpoint"] = str(Path(checkpoint).resolve())
    if device is not None:
        settings["device"] = f"$torch.device({device!r})"
    configs, variants = [], []
    for path in resolve_config_files(["configs/inference.yaml"] if config_file is None else config_file):
        (variants if _is_training_config(path) else configs).append(path)
    if len(variants) > 1:
        raise OptionError(f"config_file: {', '.join(variants)} are several training variants; give one")
    if variants:
        settings["inference_recipe"] = variant_recipe(variants[0])
        logger.info("running the inference recipe of %s", variants[0])
    if not configs:
        configs = resolve_config_files(["configs/inference.yaml"])
    settings.update(overrides)
    with working_directory(BUNDLE_ROOT), _unwrapped_data_errors():
        workflow = ConfigWorkflow(config_file=configs, workflow_type="inference", **settings)
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        names = [item["case_id"] for item in workflow.parser.get_parsed_content("datalist")]
    return [str(output_path(settings["output_dir"], n, "seg")) for n in names]


@contextmanager
def _unwrapped_data_errors() -> Iterator[None]:
    """Re-raise the user's :class:`DataError` itself instead of MONAI's "Failed to evaluate" wrapper."""
    try:
        yield
    except Exception as err:
        cause = find_user_error(err)
        if cause is None:
            raise
        raise cause from None
