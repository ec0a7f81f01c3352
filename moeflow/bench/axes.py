"""The engine configurations `moeflow bench offline` compares in one process: predictor x routing x scheduling.

Each axis is a comma list on the command line; the grid is their product, and the first of every list
is the baseline configuration that the report compares the others with, cell by cell (same budget, same
batch, same prompts). Each axis value is turned into an engine object by one loader here, the one place
to wire a new predictor, selector or scheduling policy into the benchmark:

    load_predictor_arg(text, engine)   none | previous | frequency | PRED_DIR (not yet)
    load_selector_arg(text, engine)    exact | lynx (not yet)
    load_scheduling_arg(text, spec)    fcfs | route-aware (not yet)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from moeflow.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Configuration:
    predictor: str = "none"
    routing: str = "exact"
    scheduling: str = "fcfs"

    @property
    def label(self) -> str:
        return f"{self.predictor}/{self.routing}/{self.scheduling}"

    def as_dict(self) -> dict:
        return {"predictor": self.predictor, "routing": self.routing, "scheduling": self.scheduling}


def grid(predictors: list[str], routings: list[str], schedulings: list[str]) -> list[Configuration]:
    """Every combination, the baseline (the first of each list) first."""
    for name, values in (("--predictors", predictors), ("--routing", routings), ("--scheduling", schedulings)):
        if not values:
            raise ConfigError(f"{name} needs at least one value")
        if len(set(values)) != len(values):
            raise ConfigError(f"{name} names a value twice: {','.join(values)}")
    return [Configuration(p, r, s) for p, r, s in itertools.product(predictors, routings, schedulings)]


def load_predictor_arg(text: str, engine):
    """A predictor for `--predictors` value `text`: None for `none`, a built-in by name, or (to come) a
    trained predictor's directory."""
    from moeflow.routing.predictors import BUILTIN, make_predictor

    if text == "none":
        return None
    if text in BUILTIN:
        return make_predictor(text, engine.spec)
    if Path(text).is_dir():
        # issue 12: a trained predictor's directory loads through the routing package's loader, once it exists
        raise ConfigError(f"--predictors {text}: loading a trained predictor from a directory is not supported "
                          "yet (moeflow.bench.axes.load_predictor_arg knows none, " + ", ".join(BUILTIN) + ")")
    raise ConfigError(f"--predictors {text!r}: not a built-in predictor (none, {', '.join(BUILTIN)}) or a directory")


def load_selector_arg(text: str, engine):
    """The selector for `--routing` value `text` (None: exact routing, the model's own)."""
    if text == "exact":
        return None
    if text == "lynx":
        from moeflow.routing.lynx import AffinityBinning

        return AffinityBinning.for_spec(engine.spec)
    raise ConfigError(f"--routing {text!r} unknown; choose exact or lynx")


def load_scheduling_arg(text: str, spec):
    """A scheduling policy for `--scheduling` value `text`, for a model of `spec` (before any engine exists:
    the engine is built with the first configuration's policy)."""
    from moeflow.engine.policies import POLICIES

    if text in POLICIES:
        return POLICIES[text]()
    raise ConfigError(f"--scheduling {text!r} unknown; choose one of {', '.join(POLICIES)}")


def check(configurations: list[Configuration], engine) -> None:
    """Load every axis value once, so that a bad one fails before any run, not an hour into the grid."""
    for text in dict.fromkeys(c.predictor for c in configurations):
        load_predictor_arg(text, engine)
    for text in dict.fromkeys(c.routing for c in configurations):
        load_selector_arg(text, engine)
    names = list(dict.fromkeys(c.scheduling for c in configurations))
    for text in names:
        load_scheduling_arg(text, engine.spec)
    if names != [engine.scheduler.policy.name] and not hasattr(engine, "set_scheduling"):
        raise ConfigError(f"--scheduling {','.join(names)}: this engine cannot change its scheduling policy "
                          f"between runs (it runs {engine.scheduler.policy.name}); LLMEngine.set_scheduling is "
                          "not there yet")


def apply(configuration: Configuration, engine) -> None:
    """Set the engine up for `configuration` (between runs: nothing may be running): a new predictor, with no
    history; the selector and the scheduling policy only when they change, since a new selector captures the
    decode graphs again."""
    engine.set_predictor(load_predictor_arg(configuration.predictor, engine))
    # exact requests run the exact graphs whatever selector the engine offers, so only a missing one is set
    if configuration.routing != "exact" and (engine.selector is None or engine.selector.name != configuration.routing):
        engine.set_selector(load_selector_arg(configuration.routing, engine))
    if engine.scheduler.policy.name != configuration.scheduling:
        engine.set_scheduling(load_scheduling_arg(configuration.scheduling, engine.spec))
