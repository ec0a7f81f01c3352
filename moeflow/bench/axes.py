"""The engine configurations `moeflow bench offline` compares in one process: predictor x routing x scheduling.

Each axis is a comma list on the command line; the grid is their product, and the first of every list
is the baseline configuration that the report compares the others with, cell by cell (same budget, same
batch, same prompts). Each axis value is turned into an engine object by one loader here, the one place
to wire a new predictor, selector or scheduling policy into the benchmark:

    load_predictor_arg(text, engine)   none | previous | frequency | PRED_DIR[:no-PART][:KEY=V...]
    load_selector_arg(text, engine)    exact | lynx[:alpha=A][:beta=B][:w=W][:kernel=auto|torch|triton][:rows=N|auto]
    load_scheduling_arg(text, spec)    fcfs | route-aware[:wait=W][:admit=A], either with [:overlap=0|1][:async=0|1]

A trained predictor runs with ExpertFlow's predictive cache (experts/predictive.py); `PRED_DIR:no-PART`
switches one part of it off for an ablation: quotas, protect, prefetch, correct (the planner's parts) or
adapt (the predictor's online adaptation); `PRED_DIR:KEY=V[:KEY=V]` sets the planner's settings
(PLANNER_SETTINGS: prefetch_at, lookahead, by_value, ...) for a sweep, beside or without a `no-PART`. `lynx`
takes the model's (alpha, beta) defaults and w = 0 (plain LYNX); `w` > 0 is the cache-aware variant, resident
experts earning w bin-0 votes; `kernel` picks how the rule runs: `triton` in one launch per layer
(routing/_lynx_triton.py), `torch` in thirty small operations, `auto` (the default) Triton's where it is
installed; `rows=N` spreads the Triton kernel over programs of N rows (AffinityBinning.rows_per_program), the
same choice in two launches; `rows=0` keeps it in one program, and `rows=auto` (the default) spreads it from 32
rows a step. `overlap=0` on a scheduling value builds each step's outputs between it and the next, with the
device idle, and `overlap=1` while the next one runs (EngineConfig.overlap_output; by default on CUDA).
`async=1` launches each step before the host takes the last one's tokens, and `async=0` settles each step first
(EngineConfig.async_scheduling; by default on CUDA, where it applies: fcfs with every expert resident and no
predictor).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from moeflow.errors import ConfigError

PLANNER_PARTS = ("quotas", "protect", "prefetch", "correct")
ABLATIONS = PLANNER_PARTS + ("adapt",)


def _flag(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(text)
    return text == "1"


# ExpertFlowPlanner's settings a `--predictors PRED_DIR:KEY=V` value may set, for sweeps (by_value: 0 or 1)
PLANNER_SETTINGS = {"prefetch_at": float, "protect_at": float, "lookahead": int, "issue_now": int,
                    "issue_per_layer": int, "reuse_weight": float, "reuse_decay": float, "levels": int,
                    "prefetch_margin": float, "by_value": _flag, "cross_step": _flag,
                    "ahead_weight": float, "rounds": int}


@dataclass(frozen=True, slots=True)
class Configuration:
    predictor: str = "none"
    routing: str = "exact"
    scheduling: str = "fcfs"

    @property
    def label(self) -> str:
        return f"{short_predictor(self.predictor)}/{self.routing}/{self.scheduling}"

    @property
    def request_routing(self) -> str:
        """What the requests of this configuration ask for (SamplingParams.routing)."""
        return self.routing.split(":", 1)[0]

    def as_dict(self) -> dict:
        return {"predictor": self.predictor, "routing": self.routing, "scheduling": self.scheduling}


def short_predictor(text: str) -> str:
    """A predictor axis value as a label: a directory by its last name (`PRED_DIR:no-quotas` keeps the part)."""
    from moeflow.routing.predictors import BUILTIN

    path, _, part = text.partition(":")
    if path == "none" or path in BUILTIN:
        return text
    name = Path(path).name or path
    return f"{name}:{part}" if part else name


def grid(predictors: list[str], routings: list[str], schedulings: list[str]) -> list[Configuration]:
    """Every combination, the baseline (the first of each list) first."""
    for name, values in (("--predictors", predictors), ("--routing", routings), ("--scheduling", schedulings)):
        if not values:
            raise ConfigError(f"{name} needs at least one value")
        if len(set(values)) != len(values):
            raise ConfigError(f"{name} names a value twice: {','.join(values)}")
    return [Configuration(p, r, s) for p, r, s in itertools.product(predictors, routings, schedulings)]


def listed(texts: list[str]) -> list[Configuration]:
    """Configurations named whole, `PREDICTOR/ROUTING/SCHEDULING` each (as the report labels them), the first the
    baseline: for comparisons that are not a product of the three axes (a predictor's directory may hold
    slashes; routing and scheduling values never do)."""
    out = []
    for text in texts:
        parts = text.rsplit("/", 2)
        if len(parts) != 3 or not all(parts):
            raise ConfigError(f"--configurations {text!r}: name each as PREDICTOR/ROUTING/SCHEDULING, e.g. "
                              "none/exact/fcfs")
        out.append(Configuration(*parts))
    if not out:
        raise ConfigError("--configurations needs at least one configuration")
    if len(set(out)) != len(out):
        raise ConfigError(f"--configurations names a configuration twice: {','.join(texts)}")
    return out


def with_ablations(predictors: list[str]) -> list[str]:
    """`predictors` with, after each trained predictor's directory, that directory with each part off."""
    out = []
    for text in predictors:
        out.append(text)
        if ":" not in text and Path(text).is_dir():
            out += [f"{text}:no-{part}" for part in ABLATIONS]
    return out


def _predictor_dir(text: str) -> tuple[Path, str | None, dict[str, float | int]]:
    """PRED_DIR[:no-PART][:SETTING=V...] -> (the directory, the part switched off or None, planner settings)."""
    path, *items = text.split(":")
    part, settings = None, {}
    for item in items:
        key, eq, value = item.partition("=")
        if eq and key in PLANNER_SETTINGS:
            try:
                settings[key] = PLANNER_SETTINGS[key](value)
            except ValueError:
                raise ConfigError(f"--predictors {text}: {key} must be a number (by_value: 0 or 1), "
                                  f"got {value!r}") from None
        elif not eq and part is None and item.startswith("no-") and item[3:] in ABLATIONS:
            part = item[3:]
        else:
            raise ConfigError(f"--predictors {text}: after ':' name one part to switch off, one of "
                              + ", ".join(f"no-{p}" for p in ABLATIONS) + ", or set one of the predictive cache's "
                              "settings, " + ", ".join(f"{k}=V" for k in PLANNER_SETTINGS) + f"; got {item!r}")
    return Path(path), part, settings


def load_predictor_arg(text: str, engine):
    """A predictor for `--predictors` value `text`: None for `none`, a built-in by name, or a trained
    predictor's directory (refused if it was trained for another model)."""
    from moeflow.routing.predictors import BUILTIN, make_predictor

    if text == "none":
        return None
    if text in BUILTIN:
        return make_predictor(text, engine.spec)
    path, part, _ = _predictor_dir(text)
    if path.is_dir():
        from moeflow.routing.predictors import load_predictor

        return load_predictor(path, engine.checkpoint, engine.device, adapt=part != "adapt",
                              embedding=engine.model.w["model.embed_tokens.weight"])
    raise ConfigError(f"--predictors {text!r}: not a built-in predictor (none, {', '.join(BUILTIN)}) or a directory")


def load_planner_arg(text: str):
    """The planner for `--predictors` value `text`: None (the engine's default for the predictor) unless it
    switches off one of the predictive cache's parts or sets one of its settings."""
    if text == "none" or ":" not in text:
        return None
    from moeflow.experts.predictive import ExpertFlowPlanner

    _, part, settings = _predictor_dir(text)
    if part not in PLANNER_PARTS and not settings:
        return None
    return ExpertFlowPlanner(**({part: False} if part in PLANNER_PARTS else {}), **settings)


def load_selector_arg(text: str, engine):
    """The selector for `--routing` value `text` (None: exact routing, the model's own)."""
    if text == "exact":
        return None
    name, _, rest = text.partition(":")
    if name == "lynx":
        from moeflow.routing.lynx import AffinityBinning

        given = {}
        for item in filter(None, rest.split(":")):
            key, eq, value = item.partition("=")
            if not eq or key not in ("alpha", "beta", "w", "kernel", "rows"):
                raise ConfigError(f"--routing {text!r}: lynx takes alpha=A, beta=B, w=W, kernel=auto|torch|triton "
                                  f"and rows=N|auto after ':', got {item!r}")
            try:
                if key == "kernel" or key == "rows" and value == "auto":
                    given[key] = value
                else:
                    given[key] = float(value) if key == "alpha" else int(value)
            except ValueError:
                raise ConfigError(f"--routing {text!r}: {key} must be a number, got {value!r}") from None
        rows = given.get("rows", "auto")
        return AffinityBinning.for_spec(engine.spec, given.get("alpha"), given.get("beta"), given.get("w", 0),
                                        given.get("kernel", "auto"), None if rows == 0 else rows)
    raise ConfigError(f"--routing {text!r} unknown; choose exact or lynx[:alpha=A][:beta=B][:w=W][:kernel=K][:rows=N]")


def _scheduling_options(text: str) -> tuple[str, dict[str, int]]:
    """`NAME[:wait=W][:admit=A][:overlap=0|1][:async=0|1]` -> (NAME, {option: value}); wait and admit are
    route-aware's only."""
    name, *items = text.split(":")
    allowed = {"overlap": ("0", "1"), "async": ("0", "1")} | ({"wait": None, "admit": None}
                                                               if name == "route-aware" else {})
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        values = allowed.get(key, ())
        if not eq or key not in allowed or key in options or not value.isdigit() or values and value not in values:
            wait = ("wait=W (steps a sequence may wait beyond its round-robin share, W >= 0), admit=A (steps a "
                    "new request may be held back to be prefilled with others, A >= 0) or "
                    if name == "route-aware" else "")
            raise ConfigError(f"--scheduling {text!r}: after ':' give {wait}overlap=0|1 (build a step's outputs "
                              "while the next one runs) or async=0|1 (launch a step before the last one's tokens "
                              "are taken), each once" + ("" if wait else " (wait=W and admit=A are route-aware's)")
                              + f"; got {item!r}")
        options[key] = int(value)
    return name, options


def load_scheduling_arg(text: str, spec):
    """A scheduling policy for `--scheduling` value `text`, for a model of `spec` (before any engine exists:
    the engine is built with the first configuration's policy)."""
    from moeflow.engine.policies import POLICIES

    name, options = _scheduling_options(text)
    if name not in POLICIES:
        raise ConfigError(f"--scheduling {text!r} unknown; choose one of {', '.join(POLICIES)} "
                          "(route-aware[:wait=W][:admit=A]; either with [:overlap=0|1][:async=0|1])")
    named = {"wait": "max_decode_wait", "admit": "max_admit_wait"}
    return POLICIES[name](**{named[k]: v for k, v in options.items() if k in named})


def scheduling_switch(text: str, name: str) -> bool | None:
    """Switch `name` ("overlap": a step's outputs built while the next one runs, EngineConfig.overlap_output;
    "async": a step launched before the last one's tokens are taken, EngineConfig.async_scheduling) as
    `--scheduling` value `text` sets it (None: not set, the engine's default)."""
    options = _scheduling_options(text)[1]
    return bool(options[name]) if name in options else None


def check(configurations: list[Configuration], engine) -> None:
    """Load every axis value once, so that a bad one fails before any run, not an hour into the grid."""
    for text in dict.fromkeys(c.predictor for c in configurations):
        load_predictor_arg(text, engine)
        load_planner_arg(text)
    for text in dict.fromkeys(c.routing for c in configurations):
        load_selector_arg(text, engine)
    for text in dict.fromkeys(c.scheduling for c in configurations):
        load_scheduling_arg(text, engine.spec)


def apply(configuration: Configuration, engine) -> None:
    """Set the engine up for `configuration` (between runs: nothing may be running): a new predictor and a new
    scheduling policy, with no history (route-aware's token table is learned in the run's own warm-up); the
    selector only when it changes, since a new selector captures the decode graphs again."""
    text = configuration.predictor
    engine.set_predictor(load_predictor_arg(text, engine), load_planner_arg(text))
    # exact requests run the exact graphs whatever selector the engine offers, so only a missing one is set
    if configuration.routing != "exact":
        selector = load_selector_arg(configuration.routing, engine)
        if engine.selector != selector:
            engine.set_selector(selector)
    engine.set_scheduling(load_scheduling_arg(configuration.scheduling, engine.spec))
    engine.overlap_output = scheduling_switch(configuration.scheduling, "overlap")  # None: the engine's default
    engine.async_scheduling = scheduling_switch(configuration.scheduling, "async")
