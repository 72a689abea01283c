"""The torch-free domain: run configuration, controller state and its pure
update, answer extraction, and the input rules every request is checked
against. Stores, reward workers and validation import this package; only
the engine imports torch."""

from .answers import MAX_ANSWER_TEXT_CHARS, final_answer, last_boxed
from .controller import (
    AdvantageBaseline,
    AdvantageScaling,
    ControllerState,
    ControllerUpdate,
    EntropyScope,
    WeightDenominator,
    WeightingConfig,
    apply_update,
)

__all__ = [
    "MAX_ANSWER_TEXT_CHARS",
    "AdvantageBaseline",
    "AdvantageScaling",
    "ControllerState",
    "ControllerUpdate",
    "EntropyScope",
    "WeightDenominator",
    "WeightingConfig",
    "apply_update",
    "final_answer",
    "last_boxed",
]
