"""A thin, typed Python client for the MaxEnt-GRPO reward-and-weighting service.

    from maxent_client import MaxEntClient, WeightingConfig
    with MaxEntClient("127.0.0.1:50051") as client:
        client.create_run("exp-1", WeightingConfig(tau=0.5, beta=0.04))
        stats = client.compute_reward_statistics(utilities=[[1.0, 0.0], [0.5, 0.5]])
        weights = client.compute_weight_stats("exp-1", q_values=stats.q_values, ...)

Needs only grpcio, protobuf and numpy. The generated stubs live in
maxent_api._generated for callers who want the raw messages.

Names follow the proto (maxent.v1). Former names stay as aliases of the
same objects: Denominator (WeightDenominator), FailurePolicy
(RewardFailurePolicy), SeedGrpo (SeedGrpoOptions), RewardFunctionInfo
(RewardFunction).
"""

from .aio import AsyncMaxEntClient
from .client import MaxEntClient
from .errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    MaxEntError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ResourceInfo,
    RewardFailedError,
    RewardFailure,
    UnauthenticatedError,
    UnavailableError,
    VersionConflictError,
)
from .models import (
    ControllerState,
    Denominator,
    FailurePolicy,
    RewardFailurePolicy,
    RewardFunction,
    RewardFunctionInfo,
    RewardStatistics,
    RewardTerm,
    RewardValues,
    Run,
    SeedGrpo,
    SeedGrpoOptions,
    StepStatistics,
    UpdateResult,
    WeightDenominator,
    WeightingConfig,
    WeightStats,
)

__all__ = [
    "AlreadyExistsError",
    "AsyncMaxEntClient",
    "ControllerState",
    "DeadlineExceededError",
    "Denominator",
    "FailurePolicy",
    "FieldViolation",
    "InvalidArgumentError",
    "MaxEntClient",
    "MaxEntError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ResourceInfo",
    "RewardFailedError",
    "RewardFailure",
    "RewardFailurePolicy",
    "RewardFunction",
    "RewardFunctionInfo",
    "RewardStatistics",
    "RewardTerm",
    "RewardValues",
    "Run",
    "SeedGrpo",
    "SeedGrpoOptions",
    "StepStatistics",
    "UnauthenticatedError",
    "UnavailableError",
    "UpdateResult",
    "VersionConflictError",
    "WeightDenominator",
    "WeightStats",
    "WeightingConfig",
]
