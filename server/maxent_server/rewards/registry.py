"""The registry of reward functions: the builtins and entry-point plugins.

Plugins are Python entry points in the group ``maxent.rewards`` (see
:data:`PLUGIN_GROUP`). The entry point's name is the reward's name; its object
is a callable ``(completions: list[str], answers: list[str], **params) ->
list[float]``. These optional attributes on the callable describe it:

``maxent_description`` (str)
    Its exact rule, shown by ListRewardFunctions. Default: the callable's
    docstring, whitespace collapsed; else empty.
``maxent_parameters`` (sequence)
    The parameters it accepts, each a :class:`~.params.ParamSpec` or a
    mapping with the keys ``name``, ``description``, ``type`` (``str``,
    ``int``, ``float`` or ``bool``; default ``str``), ``default`` (text),
    ``required`` (bool), ``minimum``/``maximum`` (numbers) and ``choices``
    (allowed values of a ``str`` parameter). A term's
    params are checked against them; the callable receives the typed values,
    with defaults filled in, as keyword arguments. Default: no parameters.
``maxent_needs_answers`` (bool)
    Whether it reads the gold answers. Default True.

The runner calls a plugin with one completion at a time (one-element lists)
in a worker process, so the per-completion time limit applies to each; it must
return a list of one finite number. Identical (completion, answer, params)
within one call are evaluated once, so a plugin must be a pure function of
them.

A plugin whose name clashes with a builtin or an earlier plugin, whose object
cannot be loaded or is not callable, or whose declarations are invalid is
skipped with a logged warning; the server still starts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from . import builtin, code, library
from .params import ParamSpec, param_spec_from_declaration, parse_params

log = logging.getLogger(__name__)

PLUGIN_GROUP = "maxent.rewards"
BUILTIN_SOURCE = "builtin"

#: Where a reward function runs.
KIND_INPROCESS = "inprocess"
KIND_MATH = "math"
#: Called through the plugin interface in a worker process: an entry-point
#: plugin (with its entry point) or a library reward (without one: the workers
#: have :data:`.library.WORKER_FUNCTIONS` built in).
KIND_PLUGIN = "plugin"


@dataclass(frozen=True)
class RewardSpec:
    """Everything the runner needs to know about one reward function."""

    name: str
    description: str
    parameters: tuple[ParamSpec, ...]
    source: str
    kind: str
    needs_answers: bool
    # module:attr of a plugin's entry point (what a worker loads); "" for builtins.
    entry_point: str = ""


_BUILTINS: tuple[RewardSpec, ...] = (
    RewardSpec(
        name=builtin.MATH_ACCURACY,
        description=builtin.MATH_ACCURACY_DESCRIPTION,
        parameters=(
            ParamSpec(
                name="float_rounding",
                description="Decimal digits floats are rounded to before numeric comparison (math-verify's "
                "float_rounding).",
                type="int",
                default="6",
                minimum=0,
                maximum=15,
            ),
        ),
        source=BUILTIN_SOURCE,
        kind=KIND_MATH,
        needs_answers=True,
    ),
    RewardSpec(
        name=builtin.BOXED_ACCURACY,
        description=builtin.BOXED_ACCURACY_DESCRIPTION,
        parameters=(),
        source=BUILTIN_SOURCE,
        kind=KIND_INPROCESS,
        needs_answers=True,
    ),
    RewardSpec(
        name=builtin.FORMAT,
        description=builtin.FORMAT_DESCRIPTION,
        parameters=(
            ParamSpec(
                name="rule",
                description="Which format rule: strict (this service's) or library (the published library's, "
                "with newlines around the tags); the description states both.",
                default=builtin.FORMAT_RULE_STRICT,
                choices=builtin.FORMAT_RULES,
            ),
        ),
        source=BUILTIN_SOURCE,
        kind=KIND_INPROCESS,
        needs_answers=False,
    ),
    RewardSpec(
        name=builtin.MISSING_BOXED_PENALTY,
        description=builtin.MISSING_BOXED_PENALTY_DESCRIPTION,
        parameters=(),
        source=BUILTIN_SOURCE,
        kind=KIND_INPROCESS,
        needs_answers=False,
    ),
    RewardSpec(
        name=builtin.LENGTH,
        description=builtin.LENGTH_DESCRIPTION,
        parameters=(
            ParamSpec(
                name="max_len",
                description="Length in tokens from which the penalty starts. Default: the request's "
                "max_completion_len.",
                type="int",
                minimum=1,
            ),
        ),
        source=BUILTIN_SOURCE,
        kind=KIND_INPROCESS,
        needs_answers=False,
    ),
    # The reward library: evaluated in the workers, see .library.
    *(
        RewardSpec(
            name=function.name,
            description=function.description,
            parameters=function.parameters,
            source=BUILTIN_SOURCE,
            kind=KIND_PLUGIN,
            needs_answers=function.needs_answers,
        )
        for function in library.FUNCTIONS
    ),
)

# Code execution (off unless enabled): a builtin that runs in the workers like a plugin.
CODE_EXECUTION_DISABLED = (
    f"reward function '{code.CODE_UNIT_TESTS}' runs untrusted code and is off: start the server with "
    "--enable-code-execution"
)


def code_execution_spec(mode: str) -> RewardSpec:
    """``code_unit_tests`` running in the sandbox ``mode`` (bwrap or rlimits)."""
    return RewardSpec(
        name=code.CODE_UNIT_TESTS,
        description=code.DESCRIPTION,
        parameters=code.PARAMETERS,
        source=BUILTIN_SOURCE,
        kind=KIND_PLUGIN,
        needs_answers=True,
        entry_point=code.ENTRY_POINTS[mode],
    )


_SPACES = re.compile(r"\s+")


def describe_plugin(obj: Any) -> tuple[str, tuple[ParamSpec, ...], bool]:
    """(description, parameters, needs_answers) from a plugin's attributes.

    Raises ValueError when the object is not callable or its declarations are
    invalid.
    """
    if not callable(obj):
        raise ValueError(f"object of type {type(obj).__name__} is not callable")
    description = getattr(obj, "maxent_description", None)
    if description is None:
        doc = getattr(obj, "__doc__", None) or ""
        description = _SPACES.sub(" ", doc).strip()
    if not isinstance(description, str):
        raise ValueError("maxent_description must be a string")
    declared = getattr(obj, "maxent_parameters", ())
    if isinstance(declared, (str, bytes, Mapping)) or not isinstance(declared, Iterable):
        raise ValueError("maxent_parameters must be a sequence of parameter declarations")
    parameters = tuple(param_spec_from_declaration(entry) for entry in declared)
    names = [p.name for p in parameters]
    if len(set(names)) != len(names):
        raise ValueError("maxent_parameters declares a parameter twice")
    needs_answers = getattr(obj, "maxent_needs_answers", True)
    if not isinstance(needs_answers, bool):
        raise ValueError("maxent_needs_answers must be a bool")
    return description, parameters, needs_answers


def _distribution_name(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    name = getattr(dist, "name", None) if dist is not None else None
    if not name and dist is not None:
        try:
            name = dist.metadata["Name"]
        except Exception:  # noqa: BLE001 - metadata of foreign distributions
            name = None
    return str(name) if name else "unknown"


def discover_plugins(
    entry_points: Callable[[], Iterable[metadata.EntryPoint]] | None = None,
    reserved: Iterable[str] = (),
) -> list[RewardSpec]:
    """Load the ``maxent.rewards`` entry points, skipping broken ones with a warning."""
    if entry_points is None:

        def entry_points() -> Iterable[metadata.EntryPoint]:
            return metadata.entry_points(group=PLUGIN_GROUP)

    taken = set(reserved)
    found: list[RewardSpec] = []
    for ep in sorted(entry_points(), key=lambda e: (e.name, e.value)):
        source = _distribution_name(ep)
        if not ep.name:
            log.warning("skipping reward plugin with an empty name from %s", source)
            continue
        if ep.name in taken:
            log.warning("skipping reward plugin %r from %s: the name is already taken", ep.name, source)
            continue
        try:
            obj = ep.load()
            description, parameters, needs_answers = describe_plugin(obj)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the server
            log.warning("skipping reward plugin %r from %s: %s: %s", ep.name, source, type(exc).__name__, exc)
            continue
        taken.add(ep.name)
        found.append(
            RewardSpec(
                name=ep.name,
                description=description,
                parameters=parameters,
                source=source,
                kind=KIND_PLUGIN,
                needs_answers=needs_answers,
                entry_point=ep.value,
            )
        )
    return found


class RewardRegistry:
    """Reward functions by name: the builtins, then the plugins."""

    def __init__(self, specs: Iterable[RewardSpec]) -> None:
        self._specs: dict[str, RewardSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"reward function {spec.name!r} registered twice")
            self._specs[spec.name] = spec

    @classmethod
    def default(
        cls,
        *,
        load_plugins: bool = True,
        entry_points: Callable[[], Iterable[metadata.EntryPoint]] | None = None,
        code_execution: str | None = None,
    ) -> RewardRegistry:
        """``code_execution``: the sandbox mode of ``code_unit_tests``; None leaves it off."""
        specs = list(_BUILTINS)
        if code_execution is not None:
            specs.append(code_execution_spec(code_execution))
        if load_plugins:
            reserved = [s.name for s in _BUILTINS] + [code.CODE_UNIT_TESTS]
            specs += discover_plugins(entry_points, reserved=reserved)
        return cls(specs)

    def get(self, name: str) -> RewardSpec | None:
        return self._specs.get(name)

    def specs(self) -> list[RewardSpec]:
        """All reward functions, sorted by name."""
        return [self._specs[name] for name in sorted(self._specs)]

    def plugins(self) -> list[RewardSpec]:
        """The entry-point plugins (what the workers must load)."""
        return [spec for spec in self.specs() if spec.kind == KIND_PLUGIN and spec.entry_point]

    def validate_term(
        self, index: int, name: str, params: Mapping[str, str]
    ) -> tuple[RewardSpec | None, dict[str, Any], list[tuple[str, str]]]:
        """(spec, typed params, violations) of ``rewards[index]``."""
        if not name:
            return None, {}, [(f"rewards[{index}].name", "required")]
        spec = self._specs.get(name)
        if spec is None and name == code.CODE_UNIT_TESTS:
            return None, {}, [(f"rewards[{index}].name", CODE_EXECUTION_DISABLED)]
        if spec is None:
            return None, {}, [(f"rewards[{index}].name", f"unknown reward function '{name}'")]
        values, problems = parse_params(spec.name, spec.parameters, params, index)
        return spec, values, problems
