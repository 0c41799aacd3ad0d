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

:class:`BratsTrainTask` is MONAI Label's ``BundleTrainTask`` with what it lacks: the request checked
before any work (options, labelled cases, the cases' files), a failure ending with the bundle's one
sentence as its last line (what the client's training status shows), ``train_stats`` filled after
every epoch, and default epochs sized at start-up for about 15 minutes on this machine.

:class:`StudiesDatastore` is MONAI Label's local datastore (MetaImage ``.mha`` files listed too, which
3D Slicer writes) that follows the dataset folder while the server runs: a case added to the dataset is
listed at the next refresh, without a restart. :class:`RequestChecks` answers a request for an image id
the datastore does not list with HTTP 404 naming the id, before MONAI Label reads the request's body or
resolves the id as a path (``../x`` and ``/etc/passwd`` are ids it does not list), and a training request
MONAI Label would start in vain with HTTP 422 and the sentence.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from fastapi import HTTPException
from fastapi.responses import JSONResponse
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

from bundle.errors import UserError, find_user_error, report_user_errors
from bundle.integrations.monailabel import (
    BUDGET_FILE,
    STATS_FILE,
    check_labelled_cases,
    check_studies,
    check_train_request,
    follow_dataset,
)
from bundle.options import as_bool

logger = logging.getLogger(__name__)

#: HTTP status of a request whose image cannot be segmented as it is (the sentence says why).
USER_ERROR_STATUS = 422
#: The datastore's file patterns: MONAI Label's, plus MetaImage.
DATASTORE_EXTENSIONS = [*settings.MONAI_LABEL_DATASTORE_FILE_EXT, "*.mha"]
#: MONAI Label's default epochs of a training (``BundleTrainTask.config``), used when none were sized.
MONAI_LABEL_EPOCHS = 50


class StudiesDatastore(LocalDatastore):
    """MONAI Label's ``LocalDatastore`` that follows the dataset folder of a studies view while the server runs.

    MONAI Label reconciles its list with the files of the studies folder at start-up (and on file events,
    with ``auto_reload``), but a studies *view* holds links that only :func:`.monailabel.prepare_studies`
    made: a case added to the dataset would appear after a restart. Every listing, and every request for
    an id it does not list, first refreshes the view from the dataset and MONAI Label's list from the
    view (at most once per ``refresh_seconds``); new cases are checked and a broken one is logged by name.
    """

    def __init__(self, studies: str, refresh_seconds: float = 2.0, **kwargs: Any) -> None:
        self._refresh_seconds = refresh_seconds
        self._refreshed = time.monotonic()
        self._refresh_lock = threading.Lock()
        super().__init__(studies, **kwargs)

    def follow(self, force: bool = False) -> None:
        """Refresh the view from the dataset and MONAI Label's list from the view (throttled unless ``force``)."""
        with self._refresh_lock:
            if not force and time.monotonic() - self._refreshed < self._refresh_seconds:
                return
            self._refreshed = time.monotonic()
            before = set(self._datastore.objects)
            try:
                follow_dataset(self._datastore_path)
            except (OSError, UserError) as err:  # the dataset unreadable a moment (being copied): the view stays
                logger.warning("studies: the view was not refreshed from its dataset: %s", err)
            self.refresh()
            new = sorted(set(self._datastore.objects) - before)
        if new:
            check_studies(self._datastore_path, new)  # a broken new case is named in the log now

    def has_image(self, image_id: str) -> bool:
        """Whether ``image_id`` is listed, after a refresh if it is not (a case added a moment ago)."""
        if image_id in self._datastore.objects:
            return True
        self.follow(force=True)
        return image_id in self._datastore.objects

    def list_images(self) -> list[str]:
        """MONAI Label's list, the dataset followed first."""
        self.follow()
        return super().list_images()

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """MONAI Label's training list (cases with a final label), the dataset followed first."""
        self.follow()
        return super().datalist(full_path)

    def json(self) -> Any:
        """MONAI Label's full listing (``GET /datastore/?output=all``), the dataset followed first."""
        self.follow()
        return super().json()


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


class BratsTrainTask(BundleTrainTask):
    """MONAI Label's ``BundleTrainTask`` with checks before any work, one-sentence failures, stats and sized epochs."""

    def __init__(self, path: str, conf: dict[str, str]) -> None:
        super().__init__(path, conf)
        budget: dict[str, Any] = {}
        if os.path.isfile(os.path.join(path, "configs", BUDGET_FILE)):  # written by label_serve at start-up
            with open(os.path.join(path, "configs", BUDGET_FILE)) as handle:
                budget = json.load(handle)
        self.default_epochs = int(budget.get("max_epochs", MONAI_LABEL_EPOCHS))
        self.stats_file = os.path.join(path, "models", STATS_FILE)

    def config(self) -> dict[str, Any]:
        """MONAI Label's training options (what Slicer shows), ``max_epochs`` sized at start-up."""
        options = super().config()
        options["max_epochs"] = self.default_epochs
        return options

    def stats(self) -> dict[str, Any]:
        """The last training's stats (epochs, best metric, time), as :class:`.monailabel.TrainStats` wrote them."""
        try:
            with open(self.stats_file) as handle:
                return dict(json.load(handle))
        except (OSError, ValueError):
            return {}

    def check(self, params: dict[str, Any], datastore: Datastore) -> None:
        """One sentence for a request that would fail: a bad option, too few labelled cases (no file is read)."""
        check_train_request(params, list(self.config()), len(datastore.datalist()))

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> Any:
        """Check the request and every labelled case first, then MONAI Label's training of the bundle."""
        report_user_errors()  # the training process ends with the sentence, which the client's status shows last
        self.check(request, datastore)
        check_labelled_cases(self._fetch_datalist(request, datastore))
        return super().__call__(request, datastore)

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        """The stats handler after the config's handlers (after validation), on a copy of the config's list."""
        handlers = list(overrides.get(self.const.key_train_handlers(), []))
        handlers.append(
            {
                "_target_": "bundle.integrations.monailabel.TrainStats",
                "filename": self.stats_file,
                "evaluator": "@validate#evaluator",
            }
        )
        overrides[self.const.key_train_handlers()] = handlers
        return overrides


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
        """The local datastore over the studies folder, MetaImage files included, following the dataset."""
        return StudiesDatastore(
            self.studies,
            extensions=DATASTORE_EXTENSIONS,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        """The bundle's segmentation model."""
        return {self.model_name: BratsInferTask(self.bundle_dir, self.conf)}

    def init_trainers(self) -> dict[str, TrainTask]:
        """Training from the final labels (:class:`BratsTrainTask` over the app's train.json)."""
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        task = BratsTrainTask(self.bundle_dir, self.conf)
        return {self.model_name: task} if task.is_valid() else {}

    def init_strategies(self) -> dict[str, Strategy]:
        """Which unlabelled case to annotate next."""
        return {"random": Random(), "first": First()}

    def train(self, request: dict[str, Any]) -> Any:
        """MONAI Label's training; a user's error becomes HTTP 422 with its sentence (a synchronous request)."""
        try:
            return super().train(request)
        except Exception as err:
            user_error = find_user_error(err)
            if user_error is None:
                raise
            raise HTTPException(status_code=USER_ERROR_STATUS, detail=str(user_error)) from err


# ------------------------------------------------------------------------------------------ request checks

#: (method, path) -> the query parameter that names an image id, for the endpoints that take one.
IMAGE_ID_PARAMETERS = {
    ("GET", "/datastore/image"): "image",
    ("HEAD", "/datastore/image"): "image",
    ("DELETE", "/datastore/image"): "id",
    ("GET", "/datastore/image/info"): "image",
    ("PUT", "/datastore/image/info"): "image",
    ("PUT", "/datastore/label"): "image",
    ("HEAD", "/datastore/label"): "image",
    ("GET", "/datastore/label"): "label",
    ("DELETE", "/datastore/label"): "id",
    ("GET", "/datastore/label/info"): "label",
    ("PUT", "/datastore/label/info"): "label",
}


def unknown_image(image_id: str) -> str:
    """The 404 sentence for an image id the studies do not hold."""
    return f"{image_id}: no such image among the studies served (an id is a name GET /datastore/?output=all lists)"


class RequestChecks:
    """ASGI middleware before MONAI Label's endpoints: unknown image ids are 404, doomed trainings 422.

    MONAI Label resolves an image id through its datastore, but ``POST /infer`` serves any existing path
    (``/etc/passwd``), an unknown id becomes an empty path (the bundle then reports "no DICOM files" in
    the server's folder), and ``PUT /datastore/label`` writes the upload to a temporary file before it
    looks the id up (a 500 that leaves the file behind). This checks the id first, before the body is
    read: an id is a name the datastore lists (:meth:`StudiesDatastore.has_image`), never a path.
    ``POST /train/<model>`` is checked by the trainer's :meth:`BratsTrainTask.check` before MONAI Label
    starts the training process, so a request that cannot train is answered now with its sentence.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        """Answer 404 / 422 for a request that names no known image or cannot train; pass the others on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from monailabel.interfaces.utils.app import app_instance

        method = scope["method"]
        path = scope["path"][len(settings.MONAI_LABEL_API_STR) :].rstrip("/") or "/"
        query = parse_qs(scope.get("query_string", b"").decode(), keep_blank_values=True)
        parameter = (
            "image" if method == "POST" and path.startswith("/infer/") else IMAGE_ID_PARAMETERS.get((method, path))
        )
        image_id = query.get(parameter, [""])[0] if parameter else ""
        if image_id:
            datastore = app_instance().datastore()
            listed = (
                datastore.has_image(image_id)
                if isinstance(datastore, StudiesDatastore)
                else image_id in datastore.list_images()
            )
            if not listed:
                logger.error("%s %s: %s", method, path, unknown_image(image_id))
                await JSONResponse({"detail": unknown_image(image_id)}, status_code=404)(scope, receive, send)
                return
        if method == "POST" and path.startswith("/train/"):
            body, receive = await _read_body(receive)
            # MONAI Label's app keeps its trainers by model name and offers no accessor for them
            task = app_instance()._trainers.get(path[len("/train/") :])
            if isinstance(task, BratsTrainTask):
                try:
                    params = json.loads(body) if body.strip() else {}
                    task.check(params if isinstance(params, dict) else {}, app_instance().datastore())
                except UserError as err:
                    logger.error("%s", err)
                    await JSONResponse({"detail": str(err)}, status_code=USER_ERROR_STATUS)(scope, receive, send)
                    return
                except ValueError:
                    pass  # not JSON: FastAPI answers it
        await self.app(scope, receive, send)


async def _read_body(receive: Callable) -> tuple[bytes, Callable]:
    """The request's whole body, and a ``receive`` that hands it on to the endpoint as if unread."""
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body, replayed = b"".join(chunks), False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay
