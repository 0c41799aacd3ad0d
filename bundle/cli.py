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
    """Train on the embedded demo phantoms with the default config and report the result.

    Writes checkpoints and logs under ``output_dir``; the best model goes to
    ``output_dir/models/model.pt``. Returns the best validation metrics.
    """
    from monai.bundle import ConfigWorkflow

    start = time.perf_counter()
    overrides: dict[str, Any] = {
        "bundle_root": str(BUNDLE_ROOT),
        "output_dir": str(Path(output_dir) / "train"),
        "ckpt_dir": str(Path(output_dir) / "models"),
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
    result = {
        "best_val_mean_dice": float(evaluator.state.best_metric),
        "best_epoch": int(evaluator.state.best_metric_epoch),
        "last_metrics": {k: float(v) for k, v in evaluator.state.metrics.items()},
        "train_seconds": round(time.perf_counter() - start, 1),
        "model": str(Path(output_dir) / "models" / "model.pt"),
    }
    workflow.finalize()
    logging.getLogger(__name__).info("demo result: %s", result)
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
