"""Trainer integrations, installed with the ``integrations`` extra.

* :mod:`maxent_client.integrations.trl`: a reward function for
  ``trl.GRPOTrainer(reward_funcs=[...])`` that scores completions through the
  service, and a ``transformers`` callback that steps the run's controller
  with the KL and weight entropy the trainer logged.
* :mod:`maxent_client.integrations.accelerate`: in a multi-process job only
  the main process calls the service; results reach every rank through
  Accelerate's collectives.

Nothing here imports torch, transformers, trl or accelerate until it is used,
so ``import maxent_client.integrations`` works with the core client alone.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "MaxEntRewardFunction": "trl",
    "MaxEntControllerCallback": "trl",
    "MaxEntGRPOTrainer": "trl",
    "MainProcessClient": "accelerate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
