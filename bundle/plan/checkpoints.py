"""Checkpoints: weights with the model's plan, read once, whatever version wrote them.

Every model this bundle saves (``models/model.pt``, the resumable last checkpoint, M2's gate) holds,
next to the weights, the model's plan (:mod:`bundle.plan.plan`), under MONAI ``CheckpointSaver``'s
``save_dict`` key ``model_record``::

    {"model": <state dict>, "model_record": {"plan_version": 2, "network": {...}, "preprocessing": {...}, ...}}

:class:`Checkpoint` reads a file once (one ``torch.load``) and gives the plan, migrated to the current
version (:func:`bundle.plan.plan.migrate`), and the network with its weights. MONAI's own checkpoints
hold weights only, hence this module. The model zoo's tools load ``models/model.pt`` as a plain state
dict (its CI calls ``ckpt_export`` without ``key_in_ckpt``), so the zoo export
(:mod:`bundle.integrations.export`) writes the weights alone and the plan beside them,
``models/model_record.json`` (:func:`record_file`); :func:`load_checkpoint` reads both forms.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bundle.data import file_list
from bundle.errors import DataError
from bundle.paths import BUNDLE_ROOT
from bundle.plan.network import input_divisors, network_from_spec, spatial_dims
from bundle.plan.plan import M4_PREPROCESSING, ModelPlan, migrate

MODEL_KEY = "model"
RECORD_KEY = "model_record"
logger = logging.getLogger(__name__)


class CheckpointError(DataError):
    """A checkpoint that is missing, unreadable, or does not say which network it holds."""


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}".splitlines()[0]


def record_file(path: str | Path) -> Path:
    """Where a plain state dict's plan is kept: ``<stem>_record.json`` beside it (``model_record.json``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_record.json")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by this bundle, its plan migrated; one sentence naming the file otherwise.

    Either ``{"model": weights, "model_record": plan}`` or, as the zoo export writes it, a plain state
    dict with its plan in :func:`record_file`; both are returned in the first form. Other entries (a
    training checkpoint's optimizer, trainer, ...) are kept as they are.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist (train first, or pass --checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_root_cause(err)})") from err
    if _is_state_dict(obj) and MODEL_KEY not in obj:
        sidecar = record_file(path)
        if not sidecar.is_file():
            raise CheckpointError(
                f"{path}: the checkpoint does not record the network that built it (a plain state dict, and no "
                f"{sidecar.name} beside it); save it with bundle.plan.save_model, or train it with this bundle"
            )
        try:
            obj = {MODEL_KEY: obj, RECORD_KEY: json.loads(sidecar.read_text())}
        except ValueError as err:
            raise CheckpointError(f"{sidecar}: not a readable model record ({err})") from err
    state = obj.get(MODEL_KEY) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no model state dict under {MODEL_KEY!r}")
    if not isinstance(obj.get(RECORD_KEY), Mapping) or "network" not in obj[RECORD_KEY]:
        raise CheckpointError(
            f"{path}: the checkpoint does not record the network that built it (saved by another tool or before "
            f"bundle 0.2.0); save it with bundle.plan.save_model, or train it with this bundle"
        )
    return {**obj, RECORD_KEY: migrate(obj[RECORD_KEY], str(path))}


class Checkpoint:
    """A checkpoint read once: its plan (current version) and its weights.

    ``network(device)`` builds the network the plan records and loads the weights strictly; a
    mismatch is one sentence naming the file (a hand-edited plan, weights of another network).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        content = load_checkpoint(self.path)
        self.plan: dict[str, Any] = dict(content[RECORD_KEY])
        self.weights: dict[str, torch.Tensor] = dict(content[MODEL_KEY])

    def network(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The planned network with the checkpoint's weights, in eval mode on ``device``."""
        return with_weights(network_from_spec(self.plan["network"]), self, device)


def with_weights(
    network: torch.nn.Module, checkpoint: Checkpoint | CheckpointEnsemble, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """``network`` with ``checkpoint``'s weights loaded strictly, in eval mode on ``device``.

    The network is normally the one the plan records (:meth:`Checkpoint.network`); one given instead
    (a config's ``network_def``) must fit the weights exactly. A mismatch is one sentence naming the file
    (a hand-edited plan, weights of another network), never a half-loaded network. For an ensemble, each
    member's weights go into its own network (``network`` a :class:`ModelEnsemble`, or one network copied).
    """
    if isinstance(checkpoint, CheckpointEnsemble):
        nets = list(network.members) if isinstance(network, ModelEnsemble) else []
        if len(nets) != len(checkpoint.members):
            nets = [copy.deepcopy(network) for _ in checkpoint.members]
        members = [with_weights(n, m, device) for n, m in zip(nets, checkpoint.members, strict=True)]
        return ModelEnsemble(members).to(device).eval()
    expected = network.state_dict()
    weights = checkpoint.weights
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        raise CheckpointError(
            f"{checkpoint.path}: the weights do not fit the network ({checkpoint.plan['network']['_target_']} in its "
            f"plan: {len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} differently shaped weights, "
            f"e.g. {first!r})"
        )
    network.load_state_dict(weights)
    return network.to(device).eval()


#: What the models of an ensemble must share: one preprocessing feeds them all, one window and recipe run
#: them, and their probabilities are averaged channel by channel (``what they mean`` for the sentence).
ENSEMBLE_KEYS: dict[str, str] = {
    "input_channels": "the network's input channels",
    "output_type": "the output type",
    "output_channels": "the output channels",
    "label_convention": "the label convention",
    "preprocessing": "the preprocessing",
    "spatial_dims": "the network's dimension",
    "down_sampling": "the network's down-sampling",
    "window": "the inference window",
    "inference_recipe": "the inference recipe",
}


class ModelEnsemble(torch.nn.Module):
    """The networks of an ensemble's checkpoints, run one after the other by
    :class:`bundle.inference.inferers.EnsembleInferer` (which averages their probabilities).

    A ``torch.nn.Module`` so that MONAI's ``SupervisedEvaluator`` can hold it as its ``network`` (it moves
    it and calls ``eval()``); calling it directly is an error, since averaging logits is not what an
    ensemble of probabilities does.
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Refuse: the members run through ``EnsembleInferer``, which averages their probabilities."""
        raise TypeError("ModelEnsemble runs through bundle.inference.inferers.EnsembleInferer, one member at a time")


def _ensemble_view(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The values of :data:`ENSEMBLE_KEYS` of a plan (dimension, down-sampling, window derived from it)."""
    view = {key: plan.get(key) for key in ENSEMBLE_KEYS if key in plan}
    view["spatial_dims"] = spatial_dims(plan)
    view["down_sampling"] = list(input_divisors(plan["network"]))
    view["window"] = plan.get("window") or plan.get("patch_size")
    return view


def _first_difference(a: Any, b: Any, key: str) -> tuple[str, Any, Any] | None:
    """The dotted key of the first value that differs between ``a`` and ``b`` (None: equal)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for sub in [*a, *(k for k in b if k not in a)]:
            found = _first_difference(a.get(sub), b.get(sub), f"{key}.{sub}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{key}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (key, a, b)


class CheckpointEnsemble:
    """Several checkpoints run as one model: nnU-Net's fold ensemble (their probabilities averaged).

    Every checkpoint is read once (:class:`Checkpoint`); their plans must agree on :data:`ENSEMBLE_KEYS`,
    else a :class:`CheckpointError` names both files and the first key that differs. The network may
    differ (another method with the same inputs, outputs, preprocessing, window and recipe). ``plan`` is
    the first checkpoint's: what the one preprocessing, window and recipe of the run are built from.
    MONAI's ``EnsembleEvaluator`` with ``MeanEnsembled`` would keep every model's output of a case at
    once; :class:`bundle.inference.inferers.EnsembleInferer` keeps a running sum instead.
    """

    def __init__(self, paths: Sequence[str | Path]) -> None:
        if not paths:
            raise CheckpointError("checkpoint: an empty list; give one checkpoint or several to ensemble")
        self.members = [Checkpoint(p) for p in paths]
        seen = [m.path.resolve() for m in self.members]
        twice = next((p for i, p in enumerate(seen) if p in seen[:i]), None)
        if twice is not None:
            raise CheckpointError(f"{twice}: named twice in the ensemble's checkpoints (it would count double)")
        first = self.members[0]
        reference = _ensemble_view(first.plan)
        for member in self.members[1:]:
            found = _first_difference(reference, _ensemble_view(member.plan), "")
            if found:
                key, mine, theirs = found
                what = ENSEMBLE_KEYS[key.lstrip(".").split(".", 1)[0].split("[", 1)[0]]
                raise CheckpointError(
                    f"{member.path}: its plan's {key.lstrip('.')} ({theirs!r}) differs from {first.path}'s "
                    f"({mine!r}); an ensemble's models must share {what}"
                )
        self.path = first.path
        self.plan: dict[str, Any] = first.plan

    def network(self, device: str | torch.device = "cpu") -> ModelEnsemble:
        """Every member's network with its weights, in eval mode on ``device``."""
        return ModelEnsemble([m.network(device) for m in self.members]).to(device).eval()


def load_checkpoints(path: str | Path | Sequence[str | Path]) -> Checkpoint | CheckpointEnsemble:
    """``configs/inference.yaml``'s model: one checkpoint, or a list of them as an ensemble.

    ``path``: a file, a list of files, or a list typed as one string (``"[a.pt,b.pt]"``, how
    ``monai.bundle run --checkpoint`` and ``python -m bundle infer`` hand it over). A list, even of one
    file, is an :class:`CheckpointEnsemble`; its result equals that checkpoint's own.
    """
    if isinstance(path, (str, Path)):
        paths = file_list(str(path))  # "[a.pt,b.pt]" typed as one string; an existing file is itself
        if len(paths) == 1 and not str(path).strip().startswith("["):
            return Checkpoint(path)
        path = paths
    return CheckpointEnsemble(list(path))


def read_plan(path: str | Path) -> dict[str, Any]:
    """The plan of a checkpoint, migrated to the current version."""
    return Checkpoint(path).plan


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The network a checkpoint records, with its weights, in eval mode on ``device`` (one read)."""
    return Checkpoint(path).network(device)


def default_recipe() -> dict[str, Any]:
    """M4's inference recipe as ``configs/train.yaml`` states it (the default of :func:`save_model`)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.yaml"))
    return dict(parser.get("inference_recipe"))


def save_model(
    path: str | Path,
    network: torch.nn.Module,
    output_type: str = "regions",
    patch_size: Sequence[int] | None = None,
    window: Sequence[int] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    inference_recipe: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{"model": weights, "model_record": plan}`` as training does (for tools and tests).

    ``preprocessing`` defaults to M4's (:data:`bundle.plan.plan.M4_PREPROCESSING`), ``inference_recipe``
    of a segmenter to M4's as ``configs/train.yaml`` states it.
    """
    path = Path(path)
    if inference_recipe is None and output_type != "gate":
        inference_recipe = default_recipe()
    plan = ModelPlan(
        network,
        output_type=output_type,
        patch_size=patch_size,
        window=window,
        preprocessing=M4_PREPROCESSING if preprocessing is None else preprocessing,
        inference_recipe=inference_recipe,
        training=training,
    )
    torch.save({MODEL_KEY: network.state_dict(), RECORD_KEY: plan.state_dict()}, path)
    return path
