"""The MaxEnt-GRPO reward-and-weighting gRPC server."""

__version__ = "0.1.0"
