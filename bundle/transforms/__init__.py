"""MONAI transforms the bundle adds: loading a case, label conventions, the brain mask, intensity, augmentation."""

from bundle.transforms.augment import RandChannelGammad, RandGaussianShiftIntensityd
from bundle.transforms.brain import SalientMaskd, input_channel_names, is_positive_numpy
from bundle.transforms.intensity import (
    CLAHEd,
    ClipNonzeroPercentilesd,
    MedianDenoised,
    ZScoreIntensity,
    ZScoreIntensityd,
    clahe_slices,
    clip_nonzero_percentiles,
    median_denoise,
    opencv_to_skimage_clip_limit,
)
from bundle.transforms.labels import (
    LabelsToRegions,
    LabelsToRegionsd,
    RegionsToDisjointd,
    ToInternalConventiond,
    map_label_values,
)
from bundle.transforms.loading import ConcurrentNibabelReader, LoadCaseImaged

__all__ = [
    "CLAHEd",
    "ClipNonzeroPercentilesd",
    "ConcurrentNibabelReader",
    "LabelsToRegions",
    "LabelsToRegionsd",
    "LoadCaseImaged",
    "MedianDenoised",
    "RandChannelGammad",
    "RandGaussianShiftIntensityd",
    "RegionsToDisjointd",
    "SalientMaskd",
    "ToInternalConventiond",
    "ZScoreIntensity",
    "ZScoreIntensityd",
    "clahe_slices",
    "clip_nonzero_percentiles",
    "input_channel_names",
    "is_positive_numpy",
    "map_label_values",
    "median_denoise",
    "opencv_to_skimage_clip_limit",
]
