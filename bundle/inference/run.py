"""Inference runs: the pieces ``configs/inference.yaml`` assembles, and ``infer`` behind ``python -m bundle infer``.

``configs/inference.yaml`` is the one inference pipeline, built from the checkpoint's plan alone
(:class:`bundle.plan.Checkpoint`): its preprocessing, network, window, output type and recipe. The
factories here make the config's choices (the base inferer by dimension and gate, TTA by the recipe,
the label scheme by output type) so that the config lists components. :func:`infer` runs that same
config through MONAI's ``ConfigWorkflow``, exactly as ``python -m monai.bundle run --config_file
configs/inference.yaml`` does, only with the command line's arguments as overrides; a training
variant given as ``--config_file`` contributes its method's inference recipe (:func:`variant_recipe`).
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
from monai.inferers import Inferer, SlidingWindowInferer

from bundle.atomic import remove_stale_temporaries
from bundle.data import file_list, read_voxels
from bundle.data.labels import INTERNAL, scheme_values
from bundle.errors import DataError, OptionError, find_user_error
from bundle.inference.gate import GatedSliceInferer, SliceGate
from bundle.inference.inferers import EnsembleInferer, FlipTTAInferer, ResizedSliceInferer
from bundle.inference.writers import AtomicSaveImaged
from bundle.options import as_bool, check_config_keys, folder_problem
from bundle.paths import BUNDLE_ROOT, output_path, resolve_config_files, working_directory
from bundle.plan.network import inference_window, is_gated, spatial_dims
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
            if find_user_error(err) is not None:
                raise  # the loader's own sentence (non-finite voxels), naming the file
            raise _unreadable(self.data[index], err) from err


def _unreadable(item: Mapping[str, Any], err: BaseException) -> DataError:
    """The case checks' sentence for the first of the item's files that cannot be decoded (else the error)."""
    files = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
    for path in files:
        try:
            read_voxels(path)
        except DataError as problem:
            return problem
    return DataError(f"{', '.join(str(f) for f in files)}: cannot be read ({_root_cause(err)})")


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}".splitlines()[0]


# ------------------------------------------------------------------------------------- the model


def output_type_of(plan: Mapping[str, Any]) -> str:
    """The plan's output type (``regions``, ``classes``, ``binary``); M2's gate alone does not segment."""
    output_type = str(plan["output_type"])
    if output_type not in RULE_KEYS:
        raise OptionError(f"checkpoint: a {output_type!r} model (M2's gate) does not segment; give the segmenter")
    return output_type


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


def base_inferer(
    plan: Mapping[str, Any],
    window: Sequence[int] | None = None,
    sw_batch_size: int | None = None,
    overlap: float = 0.5,
    mode: str = "gaussian",
    device: Any = "cpu",
    stitch_device: Any = None,
    gate: SliceGate | None = None,
) -> Inferer:
    """What each flip runs through: a sliding window (3-D; ``mode``: MONAI's window weighting) or slices (2-D).

    ``window``: the user's (None: the plan's, else the training patch; checked against the network).
    ``sw_batch_size``: windows or slices per network call; None: 16 slices, or 3-D windows two at a
    time on CUDA and one at a time on a CPU, where two 128^3 windows of train.yaml's network need 1.6
    times the memory of one and are not faster per window (docs/benchmarks). A 2-D model with M2's
    ``gate`` runs the segmenter only on the slices the gate passes.
    """
    chosen = inference_window(plan, window)
    device = torch.device(device)
    if spatial_dims(plan) == 2:
        per_call = 16 if sw_batch_size is None else int(sw_batch_size)
        if gate is None:
            return ResizedSliceInferer(model_size=chosen, spatial_dim=2, sw_batch_size=per_call)
        return GatedSliceInferer(
            gate=gate.network,
            threshold=gate.threshold,
            model_size=chosen,
            gate_size=gate.size,
            out_channels=len(plan["output_channels"]),
            background_channel=0 if plan["output_type"] == "classes" else None,
            spatial_dim=2,
            sw_batch_size=per_call,
        )
    per_call = (2 if device.type == "cuda" else 1) if sw_batch_size is None else int(sw_batch_size)
    return SlidingWindowInferer(
        roi_size=chosen,
        sw_batch_size=per_call,
        overlap=overlap,
        mode=mode,
        sw_device=device,
        device=stitch_device,
        cache_roi_weight_map=True,  # the Gaussian map is the same for every window, flip and case
    )


def recipe_inferer(
    base: Inferer,
    output_type: str,
    recipe: Mapping[str, Any],
    flip_batch_size: int | None = None,
    amp: Any = False,
    return_std: Any = False,
) -> EnsembleInferer:
    """The recipe's inferer: flip TTA (or one pass) around ``base``, softmax for class models, sigmoid otherwise.

    Wrapped in :class:`EnsembleInferer`: a list of checkpoints (``bundle.plan.load_checkpoints``) averages
    its models' probabilities; one network passes through unchanged.
    """
    return EnsembleInferer(
        FlipTTAInferer(
            base_inferer=base,
            activation="softmax" if output_type == "classes" else "sigmoid",
            tta=recipe["tta"],
            flip_batch_size=flip_batch_size,
            amp=as_bool(amp, "amp"),
            return_std=as_bool(return_std, "save_uncertainty"),
        )
    )


def log_recipe(
    recipe: Mapping[str, Any],
    plan: Mapping[str, Any],
    checkpoint: str | Sequence[str],
    label_scheme: str = "brats2021",
) -> dict[str, Any]:
    """Log in one line what this run does to each case (an ``initialize`` step: every option checked by then)."""
    if not isinstance(checkpoint, str):  # a fold ensemble
        checkpoint = f"an ensemble of {len(checkpoint)} checkpoints ({', '.join(str(c) for c in checkpoint)})"
    output_type = str(plan["output_type"])
    rule = {"regions": "thresholds", "binary": "mask threshold", "classes": "argmax"}[output_type]
    numbers = [f"{key} {recipe[key]}" for key in RULE_KEYS[output_type]]
    intensity = [str(step["_target_"]).rsplit(".", 1)[-1] for step in plan["preprocessing"]["intensity"]]
    network = plan["network"]
    gate = f" behind its slice gate (P(tumour) >= {network['threshold']})" if is_gated(network) else ""
    logger.info(
        "%s: %s %s model%s, %s, %s%s, post-processing: %s; labels as %s; preprocessing: %s",
        checkpoint,
        f"{spatial_dims(plan)}-D",
        output_type,
        gate,
        "flip TTA" if recipe["tta"] else "one pass",
        rule,
        f" ({', '.join(numbers)})" if numbers else "",
        ", ".join(step for step in STEPS if recipe[step]) or "none",
        label_scheme,
        ", ".join(intensity) or "none",
    )
    return dict(recipe)


def variant_recipe(config_file: str | Path) -> dict[str, Any]:
    """The inference recipe a training variant gives its models: ``configs/train.yaml``'s with the variant's keys.

    ``python -m bundle infer --config_file configs/variants/X.yaml`` runs that method's recipe on any
    checkpoint the user names. A recipe is plain values, so it is read from the files as they are: the
    variant's own ``inference_recipe`` block, or train.yaml's with the variant's ``inference_recipe#key``
    entries over it (the rest of a variant may name ids of other files of its stack, which this needs not).
    """
    base, variant = (
        yaml.safe_load(Path(path).read_text()) or {}
        for path in resolve_config_files(["configs/train.yaml", str(config_file)])
    )
    recipe = variant.get("inference_recipe", base.get("inference_recipe")) if isinstance(variant, Mapping) else None
    if not isinstance(recipe, Mapping):
        raise OptionError(f"{config_file}: inference_recipe is not a block of keys")
    recipe = dict(recipe)
    for key, value in variant.items():
        if str(key).startswith("inference_recipe#"):
            recipe[str(key).split("#", 1)[1]] = value
    return recipe


def _is_training_config(path: str) -> bool:
    """A training variant (it sets the network or the inference recipe), not an inference overlay."""
    content = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(content, Mapping):
        return False
    keys = [str(key).lstrip("+") for key in content]
    if any(key.split("#", 1)[0] == "network_factory" or key.startswith("inference_recipe#") for key in keys):
        return True
    return isinstance(content.get("inference_recipe"), Mapping)


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
    datalist: Sequence[Mapping[str, Any]], postprocessing: Any, overwrite: Any = False
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
    overwrite = as_bool(overwrite, "overwrite")
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
    checkpoint: str | Sequence[str] | None = None,
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
        checkpoint: model weights, default ``models/model.pt`` of the bundle; a list of checkpoints
            (or ``"[a.pt,b.pt]"``) is a fold ensemble: their probabilities are averaged before the
            recipe's thresholds and clean-up (:class:`bundle.plan.CheckpointEnsemble`).
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
        overrides: any other top-level config key (``window``, ``closing``, ``output_label_scheme``, ...).

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
    if checkpoint is not None:  # one file, or several (a list, or "[a.pt,b.pt]"): a fold ensemble
        paths = file_list(checkpoint if isinstance(checkpoint, (list, tuple)) else str(checkpoint))
        listed = isinstance(checkpoint, (list, tuple)) or str(checkpoint).strip().startswith("[")
        resolved = [str(Path(p).resolve()) for p in paths]
        settings["checkpoint"] = resolved if listed or len(resolved) > 1 else resolved[0]
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
    check_config_keys(configs, list(overrides))  # e.g. --ttta: one sentence, not a run with TTA
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
