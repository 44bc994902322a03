"""Run configuration: frozen dataclasses whose field metadata drive the CLI and validation.

A field exists once: its default, help text and accepted range live in its metadata, the
CLI options are generated from it (sim.cli) and ``validate_fields`` checks it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

from sim import estimators
from sim.problems import ProblemConfig, _opt, validate_problem


class ConfigError(ValueError):
    """A bad configuration value. str(e) is one line: 'option-name: what is wrong'."""


def option_name(field_name: str) -> str:
    return field_name.replace("_", "-")


@dataclass(frozen=True)
class TrainConfig:
    """How one run trains: estimator, mode, step size, seed and what is measured."""

    estimator: str = field(default="grpo", metadata=_opt(
        "advantage estimator or library preset", choices=estimators.ALL_NAMES))
    mode: Literal["exact", "sampled"] = field(default="sampled", metadata=_opt(
        "exact: population gradients; sampled: G responses per prompt", choices=("exact", "sampled")))
    group_size: int = field(default=8, metadata=_opt("responses G sampled per prompt", min=1, max=65536))
    steps: int = field(default=2000, metadata=_opt("training steps T", min=1, max=10_000_000))
    lr: float = field(default=1.0, metadata=_opt("learning rate on the (1/P)-averaged gradient",
                                                 min=0.0, max=1e9, open_min=True))
    lr_rule: Literal["fixed", "theory", "tuned"] = field(default="fixed", metadata=_opt(
        "how lr was chosen (set by the sweep)", choices=("fixed", "theory", "tuned")))
    seed: int = field(default=0, metadata=_opt("training seed (sampling)", min=0, max=2**62))
    eps: float = field(default=1e-4, metadata=_opt("eps added to the std by GRPO-type estimators",
                                                   min=0.0, max=1e3))
    ddof: int = field(default=1, metadata=_opt("ddof of the sample std (TRL/verl/OpenRLHF use 1)",
                                               min=0, max=1))
    target_fraction: float = field(default=0.9, metadata=_opt(
        "target J as a fraction of the optimal J*", min=0.0, max=1.0, open_min=True))
    log_points: int = field(default=48, metadata=_opt("log-spaced steps at which metrics are logged",
                                                      min=2, max=100_000))


@dataclass(frozen=True)
class RunConfig:
    """One run: a problem and how it is trained. ``run_id`` is a stable hash of both."""

    problem: ProblemConfig
    train: TrainConfig

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.as_flat_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(blob.encode()).hexdigest()[:16]

    def as_flat_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.problem), **dataclasses.asdict(self.train)}

    @staticmethod
    def from_flat_dict(d: dict[str, Any]) -> "RunConfig":
        pn = {f.name for f in dataclasses.fields(ProblemConfig)}
        tn = {f.name for f in dataclasses.fields(TrainConfig)}
        return RunConfig(ProblemConfig(**{k: v for k, v in d.items() if k in pn}),
                         TrainConfig(**{k: v for k, v in d.items() if k in tn}))


#: Sweep axes: every config field except those a sweep sets per run (lr, lr_rule, seed).
PROBLEM_FIELDS = tuple(f.name for f in dataclasses.fields(ProblemConfig))
TRAIN_AXES = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("lr", "lr_rule", "seed"))
AXES = PROBLEM_FIELDS + TRAIN_AXES


def _type_of(cls, name: str):
    return get_type_hints(cls)[name]


def parse_value(cls, name: str, text: str) -> Any:
    """Parse one CLI/TOML value of field ``name`` of ``cls`` and check its range."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    typ = _type_of(cls, name)
    opt = option_name(name)
    meta = f.metadata
    if isinstance(text, str):
        text = text.strip()
    try:
        if typ is int:
            if isinstance(text, bool):
                raise ValueError
            value = int(text) if not isinstance(text, float) or text.is_integer() else None
            if value is None:
                raise ValueError
        elif typ is float:
            if isinstance(text, bool):
                raise ValueError
            value = float(text)
        else:
            value = str(text)
    except (TypeError, ValueError):
        kind = "an integer" if typ is int else "a number" if typ is float else "a string"
        raise ConfigError(f"{opt}: expected {kind}, got {text!r}") from None
    check_value(cls, name, value)
    return value


def check_value(cls, name: str, value: Any) -> None:
    """Range/choice check of one field value from its metadata. Raises ConfigError."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = f.metadata
    opt = option_name(name)
    choices = meta.get("choices") or get_args(_type_of(cls, name)) or None
    if choices and isinstance(value, str):
        if value not in choices:
            raise ConfigError(f"{opt}: unknown value {value!r}; choose from {', '.join(choices)}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{opt}: must be finite, got {value}")
    lo, hi = meta.get("min"), meta.get("max")
    open_lo = meta.get("open_min") or meta.get("open_bounds")
    open_hi = meta.get("open_max") or meta.get("open_bounds")
    if lo is not None and (value < lo or (open_lo and value == lo)):
        raise ConfigError(f"{opt}: {value} is out of range; accepted: {_range_text(lo, hi, open_lo, open_hi)}")
    if hi is not None and (value > hi or (open_hi and value == hi)):
        raise ConfigError(f"{opt}: {value} is out of range; accepted: {_range_text(lo, hi, open_lo, open_hi)}")


def _range_text(lo, hi, open_lo, open_hi) -> str:
    left = "(" if open_lo else "["
    right = ")" if open_hi else "]"
    return f"{left}{lo}, {hi}{right}"


def validate_run(run: RunConfig) -> None:
    """Every field in range plus the cross-field rules. Raises ConfigError naming the option."""
    for cls, obj in ((ProblemConfig, run.problem), (TrainConfig, run.train)):
        for f in dataclasses.fields(cls):
            check_value(cls, f.name, getattr(obj, f.name))
    try:
        validate_problem(run.problem)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    t = run.train
    spec = estimators.get(t.estimator)
    if t.mode == "sampled" and t.group_size < spec.min_group:
        raise ConfigError(f"group-size: {t.estimator} needs a group of at least {spec.min_group} responses, "
                          f"got {t.group_size}")
    if t.mode == "sampled" and t.estimator == "grpo_batch" and t.group_size * run.problem.num_prompts < 2:
        raise ConfigError("group-size: grpo_batch needs at least 2 rewards in the batch")
