"""A model's plan: what built it and how it is used, recorded by value in every checkpoint.

:mod:`bundle.plan.plan` (the plan and its migration), :mod:`bundle.plan.specs` (components as plain
data), :mod:`bundle.plan.network` (the network, its down-sampling and windows),
:mod:`bundle.plan.recipes` (inference recipes), :mod:`bundle.plan.preprocessing` (the deterministic
preprocessing a plan describes), :mod:`bundle.plan.checkpoints` (reading and writing checkpoints),
:mod:`bundle.plan.gate` (M2's gate built into its segmenter).
"""

from bundle.plan.checkpoints import (
    Checkpoint,
    CheckpointEnsemble,
    CheckpointError,
    ModelEnsemble,
    load_checkpoint,
    load_checkpoints,
    load_model,
    read_plan,
    save_model,
)
from bundle.plan.gate import with_gate
from bundle.plan.network import build_network, check_window, inference_window, network_from_spec, spatial_dims
from bundle.plan.plan import ModelPlan, PlanError, fine_tune_overrides, migrate
from bundle.plan.preprocessing import preprocessing_transforms
from bundle.plan.recipes import resolve_recipe
from bundle.plan.specs import build, spec_of

__all__ = [
    "Checkpoint",
    "CheckpointEnsemble",
    "CheckpointError",
    "ModelEnsemble",
    "ModelPlan",
    "PlanError",
    "build",
    "build_network",
    "check_window",
    "fine_tune_overrides",
    "inference_window",
    "load_checkpoint",
    "load_checkpoints",
    "load_model",
    "migrate",
    "network_from_spec",
    "preprocessing_transforms",
    "read_plan",
    "resolve_recipe",
    "save_model",
    "spatial_dims",
    "spec_of",
    "with_gate",
]
