"""normswap: swap the normalization layers of existing PyTorch models, with a plan you can read."""

from .api import apply_plan, convert, plan
from .calibrate import Calibration, CalibrationResult, calibrate, synthesize_inputs
from .checks import batch_dependence
from .data import InputSet, load_inputs
from .distributed import on_this_rank_only
from .drift import ValidationFailed, validate
from .errors import (
    DataError,
    ExportError,
    ModelLoadError,
    NormswapError,
    OutputExistsError,
    PlanError,
    RecipeError,
    TraceError,
    UnknownNameError,
    UnsafeCheckpointError,
)
from .layers import (
    AnnealedGroupNorm,
    AnnealedGroupNormAct,
    ChannelLayerNorm,
    FrozenBatchNorm,
    FrozenBatchNormAct,
    GroupRMSNorm,
    GroupRMSNormAct,
)
from .progressive import ProgressiveNorm, Transition, TransitionCallback, progressive
from .recipes import Match, Recipe, Rule, builtin_recipes, load_recipe
from .recover import ImageAugment, RecoveryResult, recover
from .targets import NotApplicable, Option, Target, get_target, list_targets, register_target
from .types import Conversion, DriftReport, Facts, Plan, PlanEntry, RecoveryDefaults, Report, Site

__version__ = "0.1.0"

__all__ = [
    "plan",
    "convert",
    "apply_plan",
    "validate",
    "calibrate",
    "Calibration",
    "synthesize_inputs",
    "CalibrationResult",
    "recover",
    "RecoveryResult",
    "ImageAugment",
    "on_this_rank_only",
    "progressive",
    "Transition",
    "TransitionCallback",
    "ProgressiveNorm",
    "load_inputs",
    "InputSet",
    "ValidationFailed",
    "DriftReport",
    "save",
    "load",
    "export_onnx",
    "ExportResult",
    "batch_dependence",
    "Plan",
    "PlanEntry",
    "RecoveryDefaults",
    "Site",
    "Facts",
    "Conversion",
    "Report",
    "Recipe",
    "Rule",
    "Match",
    "load_recipe",
    "builtin_recipes",
    "Target",
    "Option",
    "NotApplicable",
    "register_target",
    "get_target",
    "list_targets",
    "ChannelLayerNorm",
    "FrozenBatchNorm",
    "FrozenBatchNormAct",
    "GroupRMSNorm",
    "GroupRMSNormAct",
    "AnnealedGroupNorm",
    "AnnealedGroupNormAct",
    "NormswapError",
    "RecipeError",
    "UnknownNameError",
    "PlanError",
    "TraceError",
    "ModelLoadError",
    "UnsafeCheckpointError",
    "OutputExistsError",
    "DataError",
    "ExportError",
]


def __getattr__(name: str):  # save/load pull in safetensors, export onnx, only when used
    if name in ("save", "load"):
        from . import io

        return getattr(io, name)
    if name in ("export_onnx", "ExportResult"):
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'normswap' has no attribute {name!r}")
