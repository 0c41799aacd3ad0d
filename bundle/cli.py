"""Command line: ``python -m bundle COMMAND --flags`` (built with fire).

Each command is a thin wrapper over a library function, imported lazily so that one
command's optional dependencies never slow down or break another.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

BUNDLE_ROOT = Path(__file__).resolve().parents[1]


def prepare(
    dataset_dir: str,
    output: str = "datalist.json",
    folds: int = 5,
    seed: int = 42,
    skip_bad: bool = False,
    layout: str | None = None,
) -> str:
    """Discover and check a BraTS 2021 / BraTS 2023 / MSD Task01 dataset and write its datalist."""
    from bundle.data import prepare as _prepare

    return _prepare(dataset_dir, output=output, folds=folds, seed=seed, skip_bad=skip_bad, layout=layout)


def train(config_file: str | list[str] = "configs/train.yaml", **overrides: Any) -> None:
    """Run ``monai.bundle run training`` in-process with optional ``--key value`` overrides."""
    from monai.bundle import run

    run("training", config_file=_resolve_configs(config_file), logging_file=str(_logging_conf()), **overrides)


def demo(output_dir: str = "runs/demo", epochs: int | None = None) -> dict[str, Any]:
    """The main job on the embedded demo: train, segment the held-out case, score it, draw it.

    1. ``configs/train.yaml`` on the demo phantoms (generated once under ``data/demo``), best
       model to ``output_dir/models/model.pt``;
    2. ``configs/inference.yaml`` (sliding window, 8-flip TTA, regions -> labels, post-processing)
       on the held-out case, written to ``output_dir/inference/<case>_seg.nii.gz``;
    3. its Dice / HD95 against the held-out truth, and ``output_dir/overlay.png`` (truth above,
       prediction below; NCR red, ED green, ET yellow).
    Returns the validation and held-out figures (also written to ``output_dir/demo_result.json``).
    """
    import json

    import nibabel as nib
    import numpy as np
    from monai.bundle import ConfigWorkflow

    from bundle.data import DataError, load_split
    from bundle.evaluation import load_label_map
    from bundle.infer import infer
    from bundle.metrics import evaluate_case
    from bundle.plots import plot_overlay

    log = logging.getLogger(__name__)
    start = time.perf_counter()
    out = Path(output_dir).resolve()
    overrides: dict[str, Any] = {
        "bundle_root": str(BUNDLE_ROOT),
        "output_dir": str(out / "train"),
        "ckpt_dir": str(out / "models"),
    }
    if epochs is not None:
        overrides["epochs"] = epochs
    workflow = ConfigWorkflow(
        config_file=str(BUNDLE_ROOT / "configs" / "train.yaml"),
        logging_file=str(_logging_conf()),
        workflow_type="train",
        run_id="training",
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    demo_dir = Path(workflow.parser.get_parsed_content("demo_dir"))
    held_out = load_split(workflow.parser.get_parsed_content("datalist_file"), split="test")
    train_seconds = time.perf_counter() - start
    workflow.finalize()
    if not held_out:
        raise DataError(f"{demo_dir}: the demo has no held-out case")
    case = held_out[0]["case_id"]

    log.info("segmenting the held-out demo case %s", case)
    infer_start = time.perf_counter()
    (segmentation,) = infer(
        str(demo_dir / case), output=str(out / "inference"), checkpoint=str(out / "models" / "model.pt")
    )
    infer_seconds = time.perf_counter() - infer_start

    truth, spacing, _ = load_label_map(demo_dir / "heldout_truth" / f"{case}_seg.nii.gz", "brats2021")
    pred, _, _ = load_label_map(segmentation, "brats2021")
    rows = evaluate_case(pred, truth, spacing, lesion_wise=False, case_id=case)
    flair = np.asarray(nib.load(str(demo_dir / case / f"{case}_flair.nii.gz")).dataobj, dtype=np.float32)
    overlay = out / "overlay.png"
    plot_overlay(flair, truth, pred, overlay, spacing=spacing, title=f"{case} (FLAIR): truth above, prediction below")

    result = {
        "best_val_mean_dice": round(float(evaluator.state.best_metric), 4),
        "best_epoch": int(evaluator.state.best_metric_epoch),
        "held_out_case": case,
        "held_out": {r["region"]: {"dice": round(r["dice"], 4), "hd95_mm": round(r["hd95"], 2)} for r in rows},
        "train_seconds": round(train_seconds, 1),
        "inference_seconds": round(infer_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "model": str(out / "models" / "model.pt"),
        "segmentation": segmentation,
        "overlay": str(overlay),
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("demo result: %s", json.dumps(result))
    return result


def _logging_conf() -> Path:
    return BUNDLE_ROOT / "configs" / "logging.conf"


def _resolve_configs(config_file: str | list[str] | tuple[str, ...]) -> list[str]:
    files = [config_file] if isinstance(config_file, str) else list(config_file)
    return [str(f if Path(f).is_absolute() or Path(f).exists() else BUNDLE_ROOT / f) for f in files]


def label_serve(
    studies: str, checkpoint: str | None = None, app_dir: str = "runs/label/app", port: int = 8000, **overrides: Any
) -> int:
    """Serve the bundle with MONAI Label on 127.0.0.1 (needs the ``label`` extra; see docs/ecosystem.md)."""
    from bundle.label import label_serve as _label_serve

    return _label_serve(studies, checkpoint=checkpoint, app_dir=app_dir, port=port, overrides=overrides or None)


def export(output: str, zip: bool = False, checkpoint: str | None = None, url_base: str | None = None) -> str:
    """Assemble a self-contained model-zoo bundle in ``output`` (see bundle/export.py)."""
    from bundle.export import export as _export

    return _export(output, zip=zip, checkpoint=checkpoint, url_base=url_base)


def infer(
    input: str | list[str],
    output: str = "runs/inference",
    checkpoint: str | None = None,
    tta: bool = True,
    device: str | None = None,
    **overrides: Any,
) -> list[str]:
    """Segment a dataset folder, a case folder or one case's files with configs/inference.yaml (bundle.infer.infer)."""
    from bundle.infer import infer as _infer

    return _infer(input, output=output, checkpoint=checkpoint, tta=tta, device=device, **overrides)


COMMANDS = {
    "prepare": prepare,
    "train": train,
    "demo": demo,
    "label_serve": label_serve,
    "export": export,
    "infer": infer,
}


def main() -> None:
    """Entry point of ``python -m bundle``."""
    import fire

    fire.Fire(COMMANDS)
