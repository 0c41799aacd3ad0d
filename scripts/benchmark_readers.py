"""Seconds to load one BraTS case (four modalities and the label) by MONAI's NibabelReader and ITKReader.

The question it answers: should NIfTI move to ITK now that ITK reads NRRD, MetaImage and DICOM?
Each real case of ``--samples`` is loaded as training and inference load it
(``bundle.transforms.LoadCaseImaged``, channel first), from NIfTI with each reader, and from
the same case converted with ITK to NRRD and MetaImage (``.mha``, gzip-compressed as Slicer writes).
Readers alternate within every repetition, so a busy machine slows all of them alike; the median
per case is reported. Prints a Markdown table and writes ``results.json``.

    python scripts/benchmark_readers.py --samples ../shared/brats_samples --repeats 5 --output runs/benchmark_readers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import itk
import torch
from monai.data import ITKReader, NibabelReader

from bundle.data import discover_cases
from bundle.transforms import LoadCaseImaged


def convert_case(item: dict, target: Path, suffix: str) -> dict:
    """The case's files rewritten by ITK with ``suffix`` (compressed), as a datalist item."""
    target.mkdir(parents=True, exist_ok=True)

    def convert(path: str) -> str:
        out = target / (Path(path).name.removesuffix(".nii.gz") + suffix)
        if not out.is_file():
            itk.imwrite(itk.imread(path), str(out), compression=True)
        return str(out)

    return {"image": [convert(p) for p in item["image"]], "label": convert(item["label"])}


def load_seconds(loader: LoadCaseImaged, item: dict, reader: object | None) -> float:
    """Wall-clock seconds of one load of ``item``."""
    start = time.perf_counter()
    loaded = loader(dict(item), reader)
    assert loaded["image"].shape[0] == 4
    return time.perf_counter() - start


def main() -> None:
    """Time every reader on every case, alternating; print and save the medians."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, help="a BraTS 2021 folder of labelled cases")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="runs/benchmark_readers")
    args = parser.parse_args()
    out = Path(args.output).resolve()
    cases = [c.to_item() for c in discover_cases(args.samples) if c.label]
    loader = LoadCaseImaged(keys=["image", "label"], ensure_channel_first=True)
    runs: dict[str, tuple[list[dict], object | None]] = {
        "NIfTI, NibabelReader (the bundle's choice)": (cases, NibabelReader()),
        "NIfTI, ITKReader": (cases, ITKReader()),
        "NRRD (gzip), ITKReader (the bundle's choice)": (
            [convert_case(c, out / "nrrd" / Path(c["label"]).parent.name, ".nrrd") for c in cases],
            None,
        ),
        "MetaImage .mha (gzip), ITKReader (the bundle's choice)": (
            [convert_case(c, out / "mha" / Path(c["label"]).parent.name, ".mha") for c in cases],
            None,
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for items, reader in runs.values():  # warm-up: imports, first file-system reads
        load_seconds(loader, items[0], reader)
    for _ in range(args.repeats):
        for index in range(len(cases)):
            for name, (items, reader) in runs.items():
                times[name].append(load_seconds(loader, items[index], reader))
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "cases": len(cases),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "median_seconds_per_case": {name: round(statistics.median(t), 3) for name, t in times.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{results['date']}: {len(cases)} cases x {args.repeats} repeats, median seconds per case")
    print("| files, reader | seconds per case |\n|---|---|")
    for name, seconds in results["median_seconds_per_case"].items():
        print(f"| {name} | {seconds} |")


if __name__ == "__main__":
    main()
