"""The MaxEnt-GRPO math: no gRPC, no storage; torch over whole ragged batches.

Configuration and the controller's pure update live in the torch-free
:mod:`maxent_server.domain`; this package computes with them."""

from .core import Engine, RewardOptions, RewardStatistics, WeightOptions, WeightStats, combine_rewards, resolve_device
from .statistics import SeedGrpoOptions

__all__ = [
    "Engine",
    "RewardOptions",
    "RewardStatistics",
    "SeedGrpoOptions",
    "WeightOptions",
    "WeightStats",
    "combine_rewards",
    "resolve_device",
]
