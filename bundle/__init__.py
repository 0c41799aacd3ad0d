"""Brain-tumour segmentation from multimodal MRI as one MONAI bundle.

The configs in ``configs/`` point at this package (``_target_: bundle.networks.ResUNet``).
"""

__version__ = "0.1.0"
