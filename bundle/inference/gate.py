"""M2's tumour-presence gate at inference: a 2-D slice classifier decides which slices the segmenter sees.

An M2 model trained with its gate holds it (:class:`bundle.networks.GatedSegmenter`, built by
:func:`bundle.plan.with_gate`) and gates its slices itself. For a segmenter saved without one, a gate
checkpoint given at inference (``--gate_checkpoint``) is run by :class:`GatedSliceInferer`: the gate
(:class:`bundle.networks.SliceGateClassifier`, trained by ``configs/train_gate.yaml``) on every slice
and the segmenter only on the slices it calls positive; the others get an empty mask. An M2
segmenter without any gate says so in one line (:func:`load_slice_gate`). :class:`GateSliceLog`
logs, per case and for the run, how many slices the gate passed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from bundle.errors import OptionError
from bundle.inference.inferers import ResizedSliceInferer
from bundle.networks import GatedSegmenter
from bundle.plan.checkpoints import Checkpoint, load_model
from bundle.plan.gate import gate_expected
from bundle.plan.network import is_gated, spatial_dims

logger = logging.getLogger(__name__)


def tumour_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(tumour) ``(N,)`` from the gate's logits: softmax over two classes, or the sigmoid of one logit."""
    logits = logits.float().reshape(logits.shape[0], -1)
    return torch.softmax(logits, dim=1)[:, 1] if logits.shape[1] == 2 else torch.sigmoid(logits[:, 0])


def load_gate(checkpoint: str, device: torch.device | str = "cpu") -> nn.Module:
    """The gate classifier ``checkpoint`` records (``gate.pt`` of configs/train_gate.yaml), in eval mode."""
    return load_model(checkpoint, device)


@dataclass(frozen=True)
class SliceGate:
    """M2's gate as inference uses it: the classifier with its weights, the slice size it takes, its threshold."""

    network: nn.Module
    size: tuple[int, ...]
    threshold: float
    checkpoint: str


def load_slice_gate(
    checkpoint: str | None,
    threshold: Any = None,
    default_threshold: float = 0.5,
    plan: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> SliceGate | None:
    """The gate of a run (its checkpoint read once), or None without ``checkpoint``; options checked first.

    ``threshold``: the probability from which the gate passes a slice (None: ``default_threshold``, the
    paper's argmax of two classes, 0.5). A threshold without a gate (it would be ignored), a threshold
    outside [0, 1], a gate for a 3-D model or for a model that holds its gate already (``plan``, the
    segmenter's) is one sentence. Without a gate, an M2 segmenter that holds none (a plan whose method
    gates slices, :func:`bundle.plan.gate.gate_expected`) says in one warning line that every slice is
    segmented.
    """
    gated = plan is not None and is_gated(plan["network"])
    if not checkpoint:
        if threshold is not None and gated:
            raise OptionError(
                f"gate_threshold: {threshold} applies to a gate given with gate_checkpoint; this model's own gate "
                f"passes a slice at P(tumour) >= {plan['network']['threshold']}, as it was trained (its plan)"
            )
        if threshold is not None:
            raise OptionError(
                f"gate_threshold: {threshold} is given without gate_checkpoint; it applies to M2's slice gate only"
            )
        if plan is not None and gate_expected(plan):
            logger.warning(
                "no gate: this M2 segmenter holds no slice gate, so every slice is segmented (train "
                "configs/train_gate.yaml and the segmenter with --gate_checkpoint, or give --gate_checkpoint)"
            )
        return None
    if gated:
        raise OptionError(
            f"gate_checkpoint: {checkpoint} is given, but the model holds its gate already (M2 trained with it)"
        )
    if plan is not None and spatial_dims(plan) != 2:
        raise OptionError(f"gate_checkpoint: {checkpoint} gates the slices of a 2-D model; the model is 3-D")
    chosen = default_threshold if threshold is None else threshold
    if isinstance(chosen, bool) or not isinstance(chosen, (int, float)) or not 0.0 <= chosen <= 1.0:
        raise OptionError(f"gate_threshold: {chosen!r} is not a probability (a number in [0, 1])")
    gate = Checkpoint(checkpoint)
    if gate.plan["output_type"] != "gate":
        raise OptionError(f"gate_checkpoint: {checkpoint} holds a {gate.plan['output_type']} model, not M2's gate")
    logger.info(
        "gate: %s, threshold %g: the segmenter runs on the slices whose P(tumour) is at least %g, the others get "
        "an empty mask",
        checkpoint,
        chosen,
        chosen,
    )
    return SliceGate(gate.network(device), tuple(int(s) for s in gate.plan["patch_size"]), float(chosen), checkpoint)


class GatedSliceInferer(ResizedSliceInferer):
    """Slice-by-slice inference that runs the segmenter only on slices the gate calls tumour-bearing.

    For every batch of slices (``sw_batch_size`` at a time) ``gate`` gives one logit per slice;
    slices with ``sigmoid(logit) < threshold`` get an "empty" output without running the
    segmenter: every channel set to ``empty_logit`` (a very negative logit: probability ~0 after a
    sigmoid), and for softmax models channel ``background_channel`` set to ``-empty_logit`` so the
    softmax is background. Positive slices are resized, segmented and resized back as in
    :class:`~bundle.inference.inferers.ResizedSliceInferer`. The gate sees the slice at ``gate_size``
    (default: ``model_size``).

    Why a subclass: MONAI's ``SliceInferer`` has no notion of skipping slices; the gate must decide
    before the network runs, inside the per-slice wrapper.

    Counters ``slices_total`` / ``slices_segmented`` / ``volumes_total`` (since the last
    :meth:`reset_counters`; a volume is counted once per flip of test-time augmentation) tell how much
    segmenter work the gate saved; :class:`GateSliceLog` logs them.

    Args:
        gate: classifier ``(N, C, H, W) -> (N, 1)`` logits.
        threshold: probability at or above which a slice is segmented.
        model_size: in-plane size of the segmenter (``None``: native size).
        gate_size: in-plane size of the classifier (``None``: ``model_size``).
        out_channels: segmenter output channels (needed to build empty outputs when no slice of a
            batch is positive).
        empty_logit: logit written for gated-out slices.
        background_channel: for softmax outputs, the channel set to ``-empty_logit``; ``None`` for sigmoid.
        args, kwargs: ``ResizedSliceInferer`` / ``SliceInferer`` arguments (``spatial_dim``,
            ``sw_batch_size``, ...).
    """

    def __init__(
        self,
        gate: nn.Module,
        threshold: float = 0.5,
        model_size: Sequence[int] | None = None,
        gate_size: Sequence[int] | None = None,
        out_channels: int = 1,
        empty_logit: float = -20.0,
        background_channel: int | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_size, *args, **kwargs)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.gate = gate
        self.threshold = float(threshold)
        self.gate_size = tuple(int(s) for s in gate_size) if gate_size is not None else self.model_size
        self.out_channels = int(out_channels)
        self.empty_logit = float(empty_logit)
        self.background_channel = background_channel
        # slices gated, slices segmented, volumes: one list that shallow copies share (FlipTTAInferer runs
        # batched flips through a copy with a larger sw_batch_size), so every flip is counted here
        self._counts = [0, 0, 0]

    def reset_counters(self) -> None:
        """Zero ``slices_total``, ``slices_segmented`` and ``volumes_total`` (of this inferer and its copies)."""
        self._counts[:] = [0, 0, 0]

    @property
    def slices_total(self) -> int:
        """Slices gated since the last reset (each volume once per flip of test-time augmentation)."""
        return self._counts[0]

    @property
    def slices_segmented(self) -> int:
        """Slices the gate passed to the segmenter since the last reset."""
        return self._counts[1]

    @property
    def volumes_total(self) -> int:
        """Volumes gated since the last reset (each case once per flip of test-time augmentation)."""
        return self._counts[2]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Gate and segment the volumes ``(B, C, H, W, D)`` slice by slice (``SliceInferer``), counting them."""
        self._counts[2] += int(inputs.shape[0])
        return super().__call__(inputs, network, *args, **kwargs)

    @property
    def fraction_segmented(self) -> float:
        """Fraction of slices the segmenter ran on since the last reset (1.0 before any slice)."""
        return self.slices_segmented / self.slices_total if self.slices_total else 1.0

    def gate_positive(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean ``(N,)``: which slices of ``(N, C, H, W)`` the gate calls tumour-bearing."""
        was_training = self.gate.training
        self.gate.eval()
        try:
            with torch.no_grad():
                size = self.gate_size if self.gate_size is not None else x.shape[2:]
                logits = self.gate(self.resize(x, size))
        finally:
            self.gate.train(was_training)
        return tumour_probability(logits) >= self.threshold

    def empty_output(self, n: int, size: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """Logits of ``n`` tumour-free slices ``(n, out_channels, *size)``."""
        out = torch.full((n, self.out_channels, *size), self.empty_logit, dtype=like.dtype, device=like.device)
        if self.background_channel is not None:
            out[:, self.background_channel] = -self.empty_logit
        return out

    def run_network(self, network: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Gate the slices ``(N, C, H, W)``, segment only the positive ones, fill the rest with empty logits."""
        positive = self.gate_positive(x)
        n_pos = int(positive.sum())
        self._counts[0] += x.shape[0]
        self._counts[1] += n_pos
        if n_pos == x.shape[0]:
            return super().run_network(network, x, *args, **kwargs)
        out = self.empty_output(x.shape[0], x.shape[2:], x)
        if n_pos:
            seg = super().run_network(network, x[positive], *args, **kwargs)
            if not isinstance(seg, torch.Tensor):
                raise TypeError("GatedSliceInferer supports networks returning one tensor (eval mode)")
            if seg.shape[1] != self.out_channels:
                raise ValueError(f"out_channels={self.out_channels} but the segmenter returned {seg.shape[1]} channels")
            out = out.to(seg.dtype)
            out[positive] = seg
        return out


class GateSliceLog:
    """Log how many slices the gate passed to the segmenter: one line per case, and the run's total at its end.

    An Ignite handler for the inference evaluator (``configs/inference.yaml``'s ``handlers`` with a
    ``gate_checkpoint``): it zeroes the inferer's counters before each case and logs them after it, so a
    user sees what share of the segmenter's work the gate took over, and notices a gate that passes
    nothing (an empty mask) or everything. MONAI's ``StatsHandler`` logs engine outputs and metrics, not
    an inferer's counts. With flip test-time augmentation every flip is gated, so each slice counts once
    per flip (the line says how many flips).

    Args:
        inferer: the run's base inferer: a :class:`GatedSliceInferer` (a gate given at inference) counts.
        network: the run's network: a :class:`bundle.networks.GatedSegmenter` (M2 with its gate) counts.
            Nothing is logged when neither gates.
        name_key: the datalist key that names a case.
    """

    def __init__(self, inferer: Any, network: Any = None, name_key: str = "case_id") -> None:
        self.inferer = inferer if isinstance(inferer, GatedSliceInferer) else network
        self.name_key = name_key
        self.cases = self.slices_total = self.slices_segmented = 0

    def attach(self, engine: Engine) -> None:
        """Count each iteration (one case with ``batch_size: 1``) and log at its end and at the run's."""
        if not isinstance(self.inferer, (GatedSliceInferer, GatedSegmenter)):
            return  # no gate in this run
        engine.add_event_handler(Events.STARTED, self.start_run)
        engine.add_event_handler(Events.ITERATION_STARTED, self.start_case)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.log_case)
        engine.add_event_handler(Events.COMPLETED, self.log_run)

    def start_run(self, engine: Engine) -> None:
        """Zero the run's totals."""
        self.cases = self.slices_total = self.slices_segmented = 0

    def start_case(self, engine: Engine) -> None:
        """Zero the inferer's counters before a case."""
        self.inferer.reset_counters()

    def log_case(self, engine: Engine) -> None:
        """One line: the case, the slices the gate passed of those it saw, and their share."""
        inferer = self.inferer
        names = _case_names(engine.state.batch, self.name_key)
        passes = ""
        # test-time flips: every slice gated once per flip (the inferer counts volumes; the network cannot)
        if getattr(inferer, "volumes_total", 0) > len(names):
            flips = inferer.volumes_total // max(1, len(names))
            passes = f"; {inferer.slices_total // max(1, inferer.volumes_total)} slices in each of {flips} flips"
        logger.info(
            "%s: the gate passed %d of %d slices to the segmenter (%s%s)",
            ", ".join(names),
            inferer.slices_segmented,
            inferer.slices_total,
            _share(inferer.slices_segmented, inferer.slices_total),
            passes,
        )
        self.cases += len(names)
        self.slices_total += inferer.slices_total
        self.slices_segmented += inferer.slices_segmented

    def log_run(self, engine: Engine) -> None:
        """One line: the slices the gate passed over all cases of the run."""
        logger.info(
            "gate: passed %d of %d slices to the segmenter over %d case(s) (%s)",
            self.slices_segmented,
            self.slices_total,
            self.cases,
            _share(self.slices_segmented, self.slices_total),
        )


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "no slice"


def _case_names(batch: Any, name_key: str) -> list[str]:
    """The case names of an engine's batch: decollated (a list of items, MONAI's default) or collated."""
    if isinstance(batch, Mapping):
        names = batch.get(name_key)
        names = [names] if isinstance(names, str) else list(names or [])
    else:
        names = [item.get(name_key) for item in batch if isinstance(item, Mapping)]
    return [str(name) for name in names if name] or ["(unnamed case)"]
