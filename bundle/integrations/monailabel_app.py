"""The MONAI Label app serving this bundle (imported by the ``main.py`` :mod:`.monailabel` writes).

Needs monailabel (the ``label`` extra, its own venv: docs/guides/monai-label-slicer.md); nothing else in the package
imports this module. It is MONAI Label's ``monaibundle`` sample app reduced to this one bundle, with
MONAI Label's own ``BundleInferTask`` / ``BundleTrainTask``; :class:`BratsInferTask` changes only what
MONAI Label does not let a bundle say:

* label names as the bundle names them, background included (``BundleInferTask`` lower-cases
  ``channel_def`` and drops ``background``), so Slicer's segments read NCR, ED, ET;
* label maps written as uint8 (MONAI Label's writer keeps the post-processing's float32);
* test-time augmentation per request (``{"tta": true}``), the server's default otherwise (one pass on a
  server without CUDA, see :func:`bundle.integrations.monailabel.label_serve`);
* a user's bad input (a case missing a modality, a corrupt file) answered with HTTP 422 and the one
  sentence naming the file, where MONAI Label would answer 500 and leave the reason in its log.

The datastore also lists MetaImage (``.mha``) files, which 3D Slicer writes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from fastapi import HTTPException
from monai.transforms import Compose
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

from bundle.errors import find_user_error
from bundle.options import as_bool

logger = logging.getLogger(__name__)

#: HTTP status of a request whose image cannot be segmented as it is (the sentence says why).
USER_ERROR_STATUS = 422
#: The datastore's file patterns: MONAI Label's, plus MetaImage.
DATASTORE_EXTENSIONS = [*settings.MONAI_LABEL_DATASTORE_FILE_EXT, "*.mha"]


class BratsInferTask(BundleInferTask):
    """MONAI Label's ``BundleInferTask`` with the bundle's label names, uint8 labels, TTA per request, 422s."""

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        if not self.valid:
            return
        with open(os.path.join(path, "configs", "metadata.json")) as handle:
            metadata = json.load(handle)
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        self.labels = {name: int(value) for value, name in channel_def.items()}
        self.default_tta = as_bool(self.bundle_config.config.get("tta", False), "tta")
        self._config["tta"] = self.default_tta
        self._lock = threading.Lock()  # one request at a time: the bundle config is changed per request

    def __call__(self, request: dict[str, Any], callbacks: dict[Any, Callable] | None = None) -> Any:
        """Run MONAI Label's pipeline with the request's ``tta``; a user's bad input becomes HTTP 422."""
        tta = as_bool(request.get("tta", self.default_tta), "tta")
        with self._lock:
            if self.bundle_config.config.get("tta") != tta:
                self.bundle_config["tta"] = tta  # re-parsed by the next get_parsed_content
            logger.info("inference with test-time augmentation %s", "on (8 flips)" if tta else "off (one pass)")
            try:
                return super().__call__(request, callbacks)
            except Exception as err:
                user_error = find_user_error(err)
                if user_error is None:
                    raise
                logger.error("%s", user_error)
                raise HTTPException(status_code=USER_ERROR_STATUS, detail=str(user_error)) from err

    def _filter_transforms(self, transforms: Any, filters: Any) -> Any:
        """MONAI Label's filter (its writers instead of the bundle's) over the transforms, nested ones too.

        The bundle's post-processing groups its clean-up steps and its writers in nested ``Compose``
        blocks; MONAI Label's filter looks at the top level only, so the chain is flattened first.
        """
        if transforms and not isinstance(transforms, Compose):
            transforms = Compose(list(transforms)).flatten().transforms
        return super()._filter_transforms(list(transforms) if transforms else transforms, filters)

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None) -> Any:
        """MONAI Label's writer, label maps as uint8 unless the request asks for ``result_dtype``."""
        return super().writer(data, extension, dtype or data.get("result_dtype") or "uint8")


class BratsBundleApp(MONAILabelApp):
    """MONAI Label app serving the bundle in ``<app>/model/<conf models>`` (inference, training, strategies)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_name = conf.get("models", "brats_resunet_segmentation")
        self.bundle_dir = os.path.join(app_dir, "model", self.model_name)
        with open(os.path.join(self.bundle_dir, "configs", "metadata.json")) as handle:
            metadata = json.load(handle)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=metadata["name"],
            description=metadata["description"],
            version=metadata["version"],
        )

    def init_datastore(self) -> Datastore:
        """MONAI Label's local datastore over the studies folder, MetaImage files included."""
        return LocalDatastore(
            self.studies,
            extensions=DATASTORE_EXTENSIONS,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        """The bundle's segmentation model."""
        return {self.model_name: BratsInferTask(self.bundle_dir, self.conf)}

    def init_trainers(self) -> dict[str, TrainTask]:
        """Training from the final labels (MONAI Label's ``BundleTrainTask`` over the app's train.json)."""
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        task = BundleTrainTask(self.bundle_dir, self.conf)
        return {self.model_name: task} if task.is_valid() else {}

    def init_strategies(self) -> dict[str, Strategy]:
        """Which unlabelled case to annotate next."""
        return {"random": Random(), "first": First()}
