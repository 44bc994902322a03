"""Shared test helpers: small problems and runs."""

from sim.config import RunConfig, TrainConfig
from sim.problems import ProblemConfig


def run(problem=None, **train) -> RunConfig:
    return RunConfig(problem or ProblemConfig(num_prompts=4, num_responses=4), TrainConfig(**train))
