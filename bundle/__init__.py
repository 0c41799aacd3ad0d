"""Brain-tumour segmentation from multimodal MRI as one MONAI bundle.

The configs in ``configs/`` point at this package (``_target_: bundle.networks.ResUNet``).
"""

__version__ = "0.1.0"

# Light (standard library only) and read by every config: `$bundle.options.as_bool(@tta, 'tta')`,
# `$bundle.errors.report_user_errors()`, also where a variant replaces a config's `imports`.
from bundle import errors, options

__all__ = ["__version__", "errors", "options"]
