"""Writers of inference's outputs: atomic NIfTI files, and 3D Slicer segmentations.

* :class:`AtomicSaveImaged` - MONAI's ``SaveImaged`` writing ``<case>_<postfix>.nii.gz`` through a hidden
  temporary file renamed when complete (a killed run never leaves a truncated result).
* :class:`NiftiWriter` - MONAI's ``NibabelWriter`` handing nibabel the voxels in NIfTI's
  own order (same bytes, fewer copies).
* :class:`SlicerSegmentationWriter` - MONAI's ``ITKWriter`` writing a ``.seg.nrrd`` with Slicer's segment
  fields; :func:`slicer_segments` names and colours the segments of a label scheme.

Both writers keep the grid they are given when no resampling is asked for (:class:`GridAsGiven`): MONAI
1.6.1's writers fail on a one-channel volume whose affine permutes the axes (PIR, ASR, ...).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import ITKWriter, MetaTensor, NibabelWriter
from monai.transforms import Invertd, MapTransform, SaveImaged
from monai.utils import ensure_tuple

from bundle.atomic import atomic_path
from bundle.constants import CLASS_NAMES, ED, LABEL_COLOURS
from bundle.data import image_stem
from bundle.data.labels import scheme_values
from bundle.options import as_bool
from bundle.paths import output_path

logger = logging.getLogger(__name__)


class AtomicSaveImaged(SaveImaged):
    """MONAI's ``SaveImaged`` writing ``<output_dir>/<case_id>_<output_postfix><output_ext>`` atomically.

    The image is written through :func:`bundle.atomic.atomic_path` (a hidden temporary file, renamed
    when complete), so an interrupted run or a failure in the writer never leaves a truncated
    ``*_seg.nii.gz`` that a later step would take for a result; two processes writing the same case
    each write their own temporary file, and whichever renames last wins with a complete file.
    The output name comes from the item's ``name_key`` (the datalist's ``case_id``) rather than the
    first input file's name (``CASE_t1.nii.gz`` would give ``CASE_t1_seg``). ``writer_options`` go to
    the writer's constructor (``SaveImage``'s ``init_kwargs``). All other arguments are ``SaveImaged``'s.
    """

    def __init__(
        self, keys: Any, name_key: str = "case_id", writer_options: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("resample", False)  # Invertd already restored the input's grid
        if str(kwargs.get("output_ext", ".nii.gz")).lower() in (".nii", ".nii.gz"):
            kwargs.setdefault("writer", NiftiWriter)
        kwargs.setdefault("print_log", False)
        super().__init__(keys, **kwargs)
        if writer_options:  # arguments of the writer class (e.g. SlicerSegmentationWriter's segments)
            self.set_options(init_kwargs=dict(writer_options))
        self.name_key = name_key
        self.output_dir = Path(kwargs.get("output_dir", "./"))
        self.output_postfix = kwargs.get("output_postfix", "trans")
        self.output_ext = kwargs.get("output_ext", ".nii.gz")

    def final_path(self, item: Mapping[Hashable, Any]) -> Path:
        """The file this transform writes for ``item``: a datalist item (before loading) or a loaded one."""
        name = item.get(self.name_key)
        if not name:
            source = item.get("image")
            source = source[0] if isinstance(source, (list, tuple)) else source
            meta = getattr(source, "meta", None)
            name = image_stem(Path(str(meta["filename_or_obj"] if meta else source)).name)
        return output_path(self.output_dir, str(name), self.output_postfix, self.output_ext)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Write every key of one item, each through a temporary file."""
        d = dict(data)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for key in self.key_iterator(d):
            name = d.get(self.name_key) or image_stem(Path(str(d[key].meta["filename_or_obj"])).name)
            final = output_path(self.output_dir, name, self.output_postfix, self.output_ext)
            with atomic_path(final, suffix=self.output_ext) as tmp:  # a full disk: one sentence naming final
                self._save(d[key], tmp)
            logger.info("wrote %s", final)
        return d

    def _save(self, image: Any, path: Path) -> None:
        """Write ``image`` to ``path`` as MONAI's ``SaveImage`` does, but with its writer's own exception.

        ``SaveImage`` tries each writer registered for the extension and, when all fail, raises "cannot
        find a suitable writer ... install the writer libraries" with their tracebacks as text: a full disk
        (Errno 28) or a read-only folder would read as a missing library. Here the writers are tried the
        same way (``SaveImage``'s own settings), and an ``OSError`` of any of them is raised as it is.
        """
        saver = self.saver
        meta = image.meta if isinstance(image, MetaTensor) else None
        data_kwargs = dict(saver.data_kwargs)
        if meta and len(ensure_tuple(meta.get("spatial_shape", ()))) >= len(image.shape):
            data_kwargs["channel_dim"] = None  # as SaveImage: the array has no channel dimension
        failures: list[Exception] = []
        for writer_class in saver.writers:
            try:
                writer = writer_class(**saver.init_kwargs)
                writer.set_data_array(data_array=image, **data_kwargs)
                writer.set_metadata(meta_dict=meta, **saver.meta_kwargs)
                writer.write(str(path), **saver.write_kwargs)  # the extension is path's: the writer is given it
                return
            except OSError:
                raise  # the disk or the folder, not the writer: no other writer would do better
            except Exception as err:  # the next writer may read what this one cannot, as in SaveImage
                failures.append(err)
        raise RuntimeError(f"{path}: none of the writers {saver.writers} could write it") from failures[-1]


def slicer_segments(scheme: str, output_type: str = "regions") -> dict[int, tuple[str, tuple[float, float, float]]]:
    """Label value -> (segment name, RGB colour) of what a model writes in a label scheme.

    ``internal``: 1, 2, 3 (NCR, ED, ET); a ``binary`` model writes one whole-tumour value, 1.
    """
    if output_type == "binary":
        return {1: ("WT", LABEL_COLOURS[ED])}
    named = sorted((value, internal) for value, internal in scheme_values(scheme).items() if internal)
    return {value: (CLASS_NAMES[internal], LABEL_COLOURS[internal]) for value, internal in named}


class GridAsGiven:
    """Writer mixin: without a target grid, the voxels and affine are written as given, never resampled.

    MONAI 1.6.1's ``ImageWriter.resample_if_needed`` runs ``SpatialResample`` even when there is nothing
    to resample (``SaveImage(resample=False)``: no target affine, no target shape). It wraps the
    channel-last array in a ``MetaTensor``, whose spatial rank MONAI infers as ``ndim - 1``: 2 for the
    squeezed ``(x, y, z)`` label map of one channel. The "2-D" resampling then inverts the affine's
    top-left 2 x 2 block, which is singular whenever the first two voxel axes are not the first two world
    axes (PIR, ASR, and 28 more of the 48 axis orders): "Affine ... is not invertible", and SaveImage
    reports it as "cannot find a suitable writer". :class:`AtomicSaveImaged` writes on the input's own
    grid (Invertd restored it), so the only correct output is the array and affine unchanged.
    """

    @classmethod
    def resample_if_needed(
        cls,
        data_array: Any,
        affine: Any = None,
        target_affine: Any = None,
        output_spatial_shape: Any = None,
        **kwargs: Any,
    ) -> tuple[Any, Any]:
        """``(data_array, affine)`` unchanged without a target grid; MONAI's resampling otherwise."""
        if target_affine is None and output_spatial_shape is None and affine is not None:
            return data_array, affine
        return super().resample_if_needed(  # type: ignore[misc]
            data_array, affine=affine, target_affine=target_affine, output_spatial_shape=output_spatial_shape, **kwargs
        )


class NiftiWriter(GridAsGiven, NibabelWriter):
    """MONAI's ``NibabelWriter`` handing nibabel the voxels in NIfTI's own (Fortran) order: the same file, faster.

    MONAI's writer gives nibabel a C-ordered array, which nibabel then writes slice by slice in
    Fortran order (one strided copy per slice). One ``np.asfortranarray`` first makes nibabel's writes
    plain copies (faster: docs/benchmarks/inference.md), and the decompressed
    bytes of the file are identical (tests/test_inference_reliability.py). :class:`AtomicSaveImaged`
    uses it for ``.nii`` / ``.nii.gz``.
    """

    @classmethod
    def create_backend_obj(
        cls, data_array: Any, affine: Any = None, dtype: Any = None, **kwargs: Any
    ) -> nib.nifti1.Nifti1Image:
        """MONAI's ``Nifti1Image``, its voxels in Fortran order."""
        image = super().create_backend_obj(data_array, affine=affine, dtype=dtype, **kwargs)
        return nib.Nifti1Image(np.asfortranarray(image.dataobj), image.affine, image.header, extra=image.extra)


class SlicerSegmentationWriter(GridAsGiven, ITKWriter):
    """MONAI's ``ITKWriter`` writing a 3D Slicer segmentation (``.seg.nrrd``): the label map plus its segments.

    Slicer opens a plain NRRD label map as a volume; with the ``Segment<i>_*`` header fields it opens it
    as a segmentation whose segments carry the class names, label values and colours (one layer, label
    values as the output scheme writes them). MONAI has no such writer; the fields are those Slicer's
    ``vtkMRMLSegmentationStorageNode`` writes, as ``key:=value`` lines of the NRRD header (ITK's NRRD
    writer, readable by pynrrd). ``segments``: label value -> (name, RGB colour in 0-1).
    """

    def __init__(
        self,
        output_dtype: Any = np.uint8,
        affine_lps_to_ras: bool | None = True,
        segments: Mapping[int, tuple[str, Sequence[float]]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(output_dtype=output_dtype, affine_lps_to_ras=affine_lps_to_ras, **kwargs)
        self.segments = dict(segments or {})

    def header_fields(self, labels: np.ndarray) -> dict[str, str]:
        """The segmentation fields of the NRRD header for a ``(x, y, z)`` label map."""
        fields = {
            "Segmentation_MasterRepresentation": "Binary labelmap",
            "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
            "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        }
        for index, (value, (name, colour)) in enumerate(sorted(self.segments.items())):
            voxels = np.nonzero(labels == value)
            extent = [int(f(axis)) for axis in voxels for f in (np.min, np.max)] if voxels[0].size else [0, -1] * 3
            fields |= {
                f"Segment{index}_ID": f"Segment_{value}",
                f"Segment{index}_Name": name,
                f"Segment{index}_NameAutoGenerated": "0",
                f"Segment{index}_Color": " ".join(f"{c:g}" for c in colour),
                f"Segment{index}_ColorAutoGenerated": "0",
                f"Segment{index}_LabelValue": str(value),
                f"Segment{index}_Layer": "0",
                f"Segment{index}_Extent": " ".join(map(str, extent)),
                f"Segment{index}_Tags": "|",
            }
        return fields

    def write(self, filename: Any, verbose: bool = False, **kwargs: Any) -> None:
        """Write the label map with the segment fields, gzip-compressed (what Slicer writes)."""
        import itk

        labels = np.asarray(self.data_obj)
        if labels.ndim != 3:
            raise ValueError(f"{filename}: a .seg.nrrd holds one 3-D label map, got shape {labels.shape}")
        self.data_obj = self.create_backend_obj(
            labels,
            channel_dim=self.channel_dim,
            affine=self.affine,
            dtype=self.output_dtype,
            affine_lps_to_ras=self.affine_lps_to_ras,
        )
        for key, value in self.header_fields(labels).items():
            self.data_obj[key] = value
        itk.imwrite(self.data_obj, str(filename), compression=True)
        check_written(filename, labels.size)


def check_written(filename: Any, voxels: int) -> None:
    """Raise the storage fault behind a file ITK wrote incompletely without a word.

    ITK's NRRD writer reports no error on a full disk: it leaves a 0-byte file and returns. Reading the
    header and voxel count back costs a few milliseconds; a file that does not read back on a full disk
    is Errno 28, named like every other write (:func:`bundle.atomic.write_error`).
    """
    import itk

    try:
        written = itk.imread(str(filename))
        complete = int(np.prod(itk.size(written))) == int(voxels)
    except Exception:  # whatever ITK says about a truncated file, it is incomplete
        complete = False
    if complete:
        return
    folder = Path(str(filename)).parent
    if shutil.disk_usage(folder).free < 64 * 1024:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
    raise OSError(
        errno.EIO, f"ITK wrote an incomplete file ({Path(str(filename)).stat().st_size} bytes)", str(filename)
    )


def to_input_grid(
    preprocessing: Any, image_key: str = "image", probabilities: Any = False, uncertainty: Any = False
) -> Invertd:
    """MONAI's ``Invertd`` back to each input's own grid: the labels (nearest), and the maps asked for.

    Undoes the crop, the reorientation and any resampling of ``preprocessing`` (the plan's steps).
    """
    keys = ["pred_label"]
    keys += ["pred_mean"] if as_bool(probabilities, "save_probabilities") else []
    keys += ["pred_std"] if as_bool(uncertainty, "save_uncertainty") else []
    return Invertd(
        keys=keys,
        transform=preprocessing,
        orig_keys=image_key,
        nearest_interp=[key == "pred_label" for key in keys],
        to_tensor=True,
        device="cpu",
    )


def output_writers(
    output_dir: str,
    label_scheme: str,
    output_type: str,
    probabilities: Any = False,
    uncertainty: Any = False,
    slicer_segmentation: Any = False,
) -> list[MapTransform]:
    """The files inference writes for each case, each atomically: ``<case>_seg.nii.gz`` and those asked for.

    ``_seg.seg.nrrd`` (a 3D Slicer segmentation of the same labels), ``_prob.nii.gz`` (the averaged
    probabilities), ``_uncertainty.nii.gz`` (the per-voxel std across the flips).
    """
    writers: list[MapTransform] = [
        AtomicSaveImaged(keys="pred_label", output_dir=output_dir, output_postfix="seg", output_dtype=np.uint8)
    ]
    if as_bool(slicer_segmentation, "save_seg_nrrd"):
        writers.append(
            AtomicSaveImaged(
                keys="pred_label",
                output_dir=output_dir,
                output_postfix="seg",
                output_ext=".seg.nrrd",
                output_dtype=np.uint8,
                writer=SlicerSegmentationWriter,
                writer_options={"segments": slicer_segments(label_scheme, output_type)},
            )
        )
    if as_bool(probabilities, "save_probabilities"):
        writers.append(
            AtomicSaveImaged(keys="pred_mean", output_dir=output_dir, output_postfix="prob", output_dtype=np.float32)
        )
    if as_bool(uncertainty, "save_uncertainty"):
        writers.append(
            AtomicSaveImaged(
                keys="pred_std", output_dir=output_dir, output_postfix="uncertainty", output_dtype=np.float32
            )
        )
    return writers
