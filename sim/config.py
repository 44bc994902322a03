"""Run configuration: frozen dataclasses whose field metadata drive the CLI and validation.

A field exists once: its default, help text and accepted range live in its metadata
(``option``), the CLI options are generated from it (sim.cli), ``check_value`` checks it and
``parse_value`` parses it from CLI or TOML text. ProblemConfig (DESIGN.md §2), TrainConfig
and RunConfig (their pair, with its stable ``run_id``) live here; sim.problems builds tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_type_hints

from sim import estimators
from sim.results import stable_id


class ConfigError(ValueError):
    """A bad configuration value. str(e) is one line: 'option-name: what is wrong'."""


def option_name(field_name: str) -> str:
    """The CLI / TOML spelling of a field: underscores become dashes."""
    return field_name.replace("_", "-")


def option(help: str, **meta) -> dict:
    """Field metadata: the option's help text plus its accepted range (min, max, open_min,
    open_max, open_bounds) or choices; the CLI and ``check_value`` both read it."""
    return {"help": help, **meta}


@dataclass(frozen=True)
class ProblemConfig:
    """One problem instance: fully determined by these fields (problem_seed included)."""

    kind: Literal["tabular", "linear"] = field(default="linear", metadata=option(
        "feature family: tabular (one-hot blocks) or linear (random unit directions)"))
    num_prompts: int = field(default=16, metadata=option("number of prompts P (m)", min=1, max=1_000_000))
    num_responses: int = field(default=8, metadata=option("candidate responses K per prompt", min=2, max=4096))
    orthogonality: float = field(default=0.5, metadata=option(
        "feature orthogonality o: weight of the private block (1 = prompts never share parameters)",
        min=0.0, max=1.0))
    private_dim: int = field(default=0, metadata=option(
        "private block size k (0 = K; tabular needs K)", min=0, max=4096))
    shared_dim: int = field(default=0, metadata=option(
        "shared block size s (0 = K; tabular needs K)", min=0, max=4096))
    base_success: float = field(default=0.3, metadata=option(
        "centre of the initial success rates p_i(0)", min=1e-6, max=1 - 1e-6, open_bounds=True))
    difficulty_spread: float = field(default=0.6, metadata=option(
        "spread of p_i(0) on the logit scale: 0 = all equal, 1 = logit half-width logit(0.99)",
        min=0.0, max=2.0))
    difficulty_layout: Literal["even", "random"] = field(default="even", metadata=option(
        "p_i(0) evenly spaced on the logit interval, or uniform draws from it"))
    reward_scale_spread: float = field(default=1.0, metadata=option(
        "c_max: reward scales c_i log-uniform in [1, c_max] (1 = all rewards in {0, 1})",
        min=1.0, max=1e6))
    reward_noise: float = field(default=0.0, metadata=option(
        "probability f that an observed reward is flipped (0 <= f < 0.5)", min=0.0, max=0.5,
        open_max=True))
    problem_seed: int = field(default=0, metadata=option("seed of the problem's random draws", min=0,
                                                       max=2**62))
    problem_file: str = field(default="", metadata=option(
        "a problem of your own: an .npz file with arrays bias [P, K], q [P, K] (probability that a "
        "response's observed reward is c_i), scale [P] (c_i > 0), phi_private [P, K, k], phi_shared "
        "[P, K, s] (sim.problems.save_problem writes one); it sets the prompts, responses and dims, and "
        "the family's options (kind, orthogonality, difficulty, rewards, seed, failure mode) do not apply"))
    problem_sha256: str = field(default="", metadata=option(
        "sha256 of --problem-file, checked when given (empty: taken from the file, and recorded)"))
    failure_mode: float = field(default=0.0, metadata=option(
        "similarity beta of every prompt's hard wrong response to its correct one, the rest of it one "
        "failure direction shared by all prompts (0 = none): gradients align as training goes on",
        min=0.0, max=0.99))

    @property
    def k(self) -> int:
        return self.private_dim or self.num_responses

    @property
    def s(self) -> int:
        return self.shared_dim or self.num_responses


MAX_PROBLEM_BYTES = 4 * 2**30


def validate_problem(cfg: ProblemConfig) -> None:
    """Cross-field checks of a problem (per-field ranges: check_value). Raises ConfigError(option: why)."""
    if cfg.kind == "tabular":
        if cfg.private_dim not in (0, cfg.num_responses):
            raise ConfigError(f"private-dim: tabular features need private_dim = K = {cfg.num_responses} (or 0)")
        if cfg.shared_dim not in (0, cfg.num_responses):
            raise ConfigError(f"shared-dim: tabular features need shared_dim = K = {cfg.num_responses} (or 0)")
    # the curvature bound M = max_i diam_i^2 compares every pair of a prompt's feature vectors:
    # the problem's features: P K (k + s) numbers, refused before they exhaust memory
    need = 8 * cfg.num_prompts * cfg.num_responses * (cfg.k + cfg.s)
    if need > MAX_PROBLEM_BYTES:
        raise ConfigError(f"num-responses: K = {cfg.num_responses} with P = {cfg.num_prompts} and k + s = "
                          f"{cfg.k + cfg.s} needs {need / 2**30:.1f} GiB of features (at most "
                          f"{MAX_PROBLEM_BYTES / 2**30:.0f} GiB); lower --num-responses, --num-prompts or the dims")


#: float64 arrays of P x K x r numbers one run holds while its diagnostics are taken (centered
#: features, Hessians, their eigen-solver's work space; r = min(K, k + s)): measured 14-25 at
#: K = 128-256, P = 16 (peak RSS of `sim run` over 5-run batches), rounded up.
RUN_ARRAYS = 24


def run_bytes(cfg: ProblemConfig) -> int:
    """Memory one run of problem ``cfg`` needs while training (RUN_ARRAYS), in bytes."""
    r = min(cfg.num_responses, cfg.k + cfg.s)
    return 8 * RUN_ARRAYS * cfg.num_prompts * cfg.num_responses * r


def machine_bytes() -> int | None:
    """Physical memory of this machine in bytes (None where unknown)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class TrainConfig:
    """How one run trains: estimator, mode, step size, seed and what is measured."""

    estimator: str = field(default="grpo", metadata=option(
        "advantage estimator or library preset", choices=estimators.ALL_NAMES))
    mode: Literal["exact", "sampled"] = field(default="sampled", metadata=option(
        "exact: population gradients; sampled: G responses per prompt"))
    group_size: int = field(default=8, metadata=option("responses G sampled per prompt", min=1, max=65536))
    steps: int = field(default=2000, metadata=option("training steps T", min=1, max=10_000_000))
    lr: float = field(default=1.0, metadata=option("learning rate on the (1/P)-averaged gradient",
                                                 min=0.0, max=1e9, open_min=True))
    lr_rule: Literal["fixed", "theory", "tuned"] = field(default="fixed", metadata=option(
        "how lr was chosen (set by the sweep)"))
    seed: int = field(default=0, metadata=option("training seed (sampling)", min=0, max=2**62))
    eps: float = field(default=1e-4, metadata=option("eps added to the std by GRPO-type estimators",
                                                   min=0.0, max=1e3))
    ddof: int = field(default=1, metadata=option("ddof of the sample std (TRL/verl/OpenRLHF use 1)",
                                               min=0, max=1))
    target_fraction: float = field(default=0.9, metadata=option(
        "target J as a fraction of the optimal J*", min=0.0, max=1.0, open_min=True))
    log_points: int = field(default=48, metadata=option("log-spaced steps at which metrics are logged",
                                                      min=2, max=100_000))
    gain_draws: int = field(default=32, metadata=option(
        "draws per logged step for the measured per-step gain in sampled mode (sim.step_gain)", min=2, max=4096))


@dataclass(frozen=True)
class RunConfig:
    """One run: a problem and how it is trained. ``run_id`` is a stable hash of both."""

    problem: ProblemConfig
    train: TrainConfig

    @property
    def run_id(self) -> str:
        return stable_id(self.as_flat_dict(), 16)

    def as_flat_dict(self) -> dict[str, Any]:
        """Every problem and train field by name (the run's config columns); fields are plain values."""
        return {**{f.name: getattr(self.problem, f.name) for f in dataclasses.fields(ProblemConfig)},
                **{f.name: getattr(self.train, f.name) for f in dataclasses.fields(TrainConfig)}}

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


def parse_int(name: str, text, lo: int | None = None, hi: int | None = None) -> int:
    """An integer option from text, an int or an integral float (TOML), range-checked when lo/hi
    are given: the one integer parser of the CLI, the config files and the sweep settings."""
    try:
        if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
            raise ValueError
        value = int(text.strip() if isinstance(text, str) else text)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}: expected an integer, got {text!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ConfigError(f"{name}: {value} is out of range; accepted: [{lo}, {hi}]")
    return value


@functools.cache
def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Field and resolved type annotation by name (typing.get_type_hints is slow; the classes are fixed)."""
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def field_type(cls, name: str):
    """The resolved type annotation of field ``name`` of config class ``cls``."""
    return _fields(cls)[name][1]


def parse_value(cls, name: str, text: str) -> Any:
    """Parse one CLI/TOML value of field ``name`` of ``cls`` and check its range."""
    f, typ = _fields(cls)[name]
    opt = option_name(name)
    if isinstance(text, str):
        text = text.strip()
    if typ is int:
        value = parse_int(opt, text)
        check_value(cls, name, value)
        return value
    try:
        if typ is float:
            if isinstance(text, bool):
                raise ValueError
            value = float(text)
        else:
            value = str(text)
    except (TypeError, ValueError):
        kind = "a number" if typ is float else "a string"
        raise ConfigError(f"{opt}: expected {kind}, got {text!r}") from None
    check_value(cls, name, value)
    return value


def check_value(cls, name: str, value: Any) -> None:
    """Range/choice check of one field value from its metadata. Raises ConfigError."""
    f, typ = _fields(cls)[name]
    meta = f.metadata
    opt = option_name(name)
    choices = meta.get("choices") or get_args(typ) or None
    if choices and isinstance(value, str):
        if value not in choices:
            raise ConfigError(f"{opt}: unknown value {value!r}; choose from {', '.join(choices)}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{opt}: must be finite, got {value}")
    lo, hi = meta.get("min"), meta.get("max")
    open_lo = meta.get("open_min") or meta.get("open_bounds")
    open_hi = meta.get("open_max") or meta.get("open_bounds")
    if (lo is not None and (value < lo or (open_lo and value == lo))) or \
            (hi is not None and (value > hi or (open_hi and value == hi))):
        raise ConfigError(f"{opt}: {value} is out of range; accepted: {range_text(meta)}")


def range_text(meta) -> str:
    """A field's accepted range from its metadata, e.g. '[0.0, 1.0]' or '(0.0, 1000000000.0]'."""
    open_lo = meta.get("open_min") or meta.get("open_bounds")
    open_hi = meta.get("open_max") or meta.get("open_bounds")
    return f"{'(' if open_lo else '['}{meta.get('min')}, {meta.get('max')}{')' if open_hi else ']'}"


def validate_run(run: RunConfig) -> None:
    """Every field in range plus the cross-field rules. Raises ConfigError naming the option."""
    for cls, obj in ((ProblemConfig, run.problem), (TrainConfig, run.train)):
        for f in dataclasses.fields(cls):
            check_value(cls, f.name, getattr(obj, f.name))
    validate_problem(run.problem)
    t = run.train
    spec = estimators.get(t.estimator)
    if t.mode == "sampled" and t.group_size < spec.min_group:
        raise ConfigError(f"group-size: {t.estimator} needs a group of at least {spec.min_group} responses, "
                          f"got {t.group_size}")
    if t.mode == "sampled" and t.estimator == "grpo_batch" and t.group_size * run.problem.num_prompts < 2:
        raise ConfigError("group-size: grpo_batch needs at least 2 rewards in the batch")


DEVICES = ("cpu", "cuda")


def check_device(device: str, backend: str = "local", allow_auto: bool = True) -> None:
    """One-line ConfigError for an unknown device, a GPU that is not there, or cuda on a Ray backend
    (Ray hides GPUs from tasks that do not reserve them). "auto" (a GPU when present) is accepted
    where ``allow_auto``."""
    choices = (("auto",) if allow_auto else ()) + DEVICES
    if device not in choices:
        raise ConfigError(f"device: unknown value {device!r}; choose from {', '.join(choices)}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but no GPU is available")
        if backend != "local":
            raise ConfigError("device: cuda runs on the local backend only")


def resolve_device(device: str) -> str:
    """The device a checked ``device`` option names: "auto" is "cuda" when a GPU is present."""
    import torch

    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
