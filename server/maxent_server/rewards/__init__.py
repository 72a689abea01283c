"""Reward functions: the builtins, entry-point plugins and the runner that evaluates them.

No gRPC here. The servicer validates request terms with
:meth:`RewardRunner.validate`, evaluates them with
:meth:`RewardRunner.evaluate` and lists them with
:meth:`RewardRunner.list_functions`.

Builtins (names are the contract; each description is the exact rule):
``math_accuracy``, ``boxed_accuracy``, ``format``, ``missing_boxed_penalty``
and ``length``; see :mod:`.builtin`. The reward library, also builtins but
evaluated in the workers like plugins: ``tag_count``, ``reasoning_steps``,
``cosine_length``, ``repetition_penalty`` and ``soft_format``; see
:mod:`.library`.

Plugins: entry points in the group ``maxent.rewards``; see :mod:`.registry`
for the callable's contract and its optional ``maxent_description``,
``maxent_parameters`` and ``maxent_needs_answers`` attributes.

Execution: :mod:`.runner` (what runs where, deduplication, failures) and
:mod:`.pool` (worker processes, per-completion time limit, replacement of
hung or dead workers), or :mod:`.ray_backend` (the same work as tasks on a
Ray cluster; imported only when chosen).
"""

from .params import ParamSpec
from .pool import ItemResult, WorkerPool
from .registry import PLUGIN_GROUP, RewardRegistry, RewardSpec
from .runner import Evaluation, RewardFunction, RewardParameter, RewardRunner, RewardTerm

__all__ = [
    "PLUGIN_GROUP",
    "Evaluation",
    "ItemResult",
    "ParamSpec",
    "RewardFunction",
    "RewardParameter",
    "RewardRegistry",
    "RewardRunner",
    "RewardSpec",
    "RewardTerm",
    "WorkerPool",
]
