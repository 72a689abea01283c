"""The MaxEnt-GRPO math: no gRPC, no storage; torch over whole ragged batches."""

from .controller import ControllerState, ControllerUpdate, Denominator, EntropyScope, RunConfig, apply_update
from .core import Engine, RewardOptions, RewardStatistics, WeightOptions, WeightStats, combine_rewards, resolve_device
from .statistics import Baseline, Scaling, SeedGrpoSettings

__all__ = [
    "Baseline",
    "Scaling",
    "ControllerState",
    "ControllerUpdate",
    "Denominator",
    "EntropyScope",
    "Engine",
    "RewardOptions",
    "RewardStatistics",
    "RunConfig",
    "SeedGrpoSettings",
    "WeightOptions",
    "WeightStats",
    "apply_update",
    "combine_rewards",
    "resolve_device",
]
