"""The sweep file as written: pydantic models of its keys (what is valid on its own, before any config is composed).

Every model forbids unknown keys. :func:`config_error` turns pydantic's ``ValidationError`` into one
:class:`~dromo_ray.errors.ConfigError` line that names the dotted key (``search.agent.alpha.uniform``,
``scheduler.grace_period``, ``arms.combo.base``) as the user wrote it: the tag of a discriminated union is not a
key of the file and does not appear. What needs the composed train config (a searched key's type, the scheduler's
defaults, a value that makes an invalid config) is checked by :mod:`dromo_ray.sweep.spec`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dromo_ray.core.config import ENV_KEYS, ExperimentConfig
from dromo_ray.errors import ConfigError

CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))
"""The sections (and top-level scalars) of a train config; a sweep file without ``arms:`` may carry them inline."""
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
METRIC_NAMESPACES = ("train/", "dynamics/", "eval/", "perf/", "rollout/", "replay/", "final/", "behavior/")
NAME_PATTERN = r"[A-Za-z0-9_.-]+"
_SECTIONS = "config_sections"


def _fail(message: str, key: str = "") -> PydanticCustomError:
    """A validation error with our own wording; ``key`` is appended to the location (model-level checks)."""
    return PydanticCustomError("sweep", "{message}", {"message": message, "key": key})


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _not_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise _fail(f"expected a number, got {v!r}")
    return v


Number = Annotated[int | float, BeforeValidator(_not_bool)]
"""A number as written (an integer stays one), never a boolean."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    known_keys: ClassVar[str] = ""
    """What an unknown key's error lists (default: the model's keys)."""

    @classmethod
    def keys_hint(cls) -> str:
        return cls.known_keys or ", ".join(cls.model_fields)


# ---------------------------------------------------------------------------------------------------------
# Distributions: one search dimension each, written as a one-key mapping ({grid: [a, b]}, {uniform: [lo, hi]}).


class Distribution(_Model):
    """One search dimension: ``grid``/``choice`` over values, or ``uniform``/``loguniform``/``randint`` [lo, hi]."""

    kind: ClassVar[str]

    @property
    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, self.kind))

    def to_tune(self) -> Any:
        from ray import tune

        v = [list(x) if isinstance(x, tuple) else x for x in self.values]
        if self.kind == "grid":
            return tune.grid_search(v)
        if self.kind == "choice":
            return tune.choice(v)
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[self.kind](lo, hi)

    def candidates(self) -> list[Any]:
        """Values that validation builds a config with: every listed value, or the ends of a range."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def describe(self) -> str:
        return f"{self.kind}{list(self.values)}"


def _listed(v: Any) -> tuple[Any, ...]:
    if not isinstance(v, list) or not v:
        raise _fail(f"expected a non-empty list, got {v!r}")
    return tuple(tuple(x) if isinstance(x, list) else x for x in v)


def _bounds(v: Any) -> tuple[Any, Any]:
    if not isinstance(v, list) or len(v) != 2 or not all(is_number(x) for x in v):
        raise _fail(f"expected [low, high] numbers, got {v!r}")
    if not v[0] < v[1]:
        raise _fail(f"low must be < high, got {v!r}")
    return v[0], v[1]


Values = Annotated[tuple[Any, ...], BeforeValidator(_listed)]
Bounds = Annotated[tuple[int | float, int | float], BeforeValidator(_bounds)]


class Grid(Distribution):
    kind: ClassVar[str] = "grid"
    grid: Values
    """Every value, each in its own trial (the basic searcher's grid)."""


class Choice(Distribution):
    kind: ClassVar[str] = "choice"
    choice: Values
    """One value per sample, drawn uniformly."""


class Uniform(Distribution):
    kind: ClassVar[str] = "uniform"
    uniform: Bounds
    """A float drawn uniformly from [low, high]."""


class LogUniform(Distribution):
    kind: ClassVar[str] = "loguniform"
    loguniform: Bounds
    """A float whose log is drawn uniformly; bounds > 0."""

    @field_validator("loguniform")
    @classmethod
    def _positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] <= 0:
            raise _fail(f"bounds must be > 0, got {list(v)!r}")
        return v


class RandInt(Distribution):
    kind: ClassVar[str] = "randint"
    randint: Bounds
    """An integer drawn uniformly from [low, high)."""

    @field_validator("randint")
    @classmethod
    def _integers(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not all(isinstance(x, int) for x in v):
            raise _fail(f"bounds must be integers, got {list(v)!r}")
        return v


def _one_distribution(v: Any) -> Any:
    if not isinstance(v, dict) or len(v) != 1:
        raise _fail(f"expected one distribution, e.g. {{grid: [a, b]}} ({', '.join(DISTRIBUTIONS)}), got {v!r}")
    kind = next(iter(v))
    if kind not in DISTRIBUTIONS:
        raise _fail(f"unknown distribution {kind!r} (one of {', '.join(DISTRIBUTIONS)})")
    return v


AnyDistribution = Annotated[
    Annotated[Annotated[Grid, Tag("grid")] | Annotated[Choice, Tag("choice")] | Annotated[Uniform, Tag("uniform")]
              | Annotated[LogUniform, Tag("loguniform")] | Annotated[RandInt, Tag("randint")],
              Discriminator(lambda v: next(iter(v)) if isinstance(v, dict) else None)],
    BeforeValidator(_one_distribution),
]


# ---------------------------------------------------------------------------------------------------------
# Scheduler, searcher, resources.


class AshaScheduler(_Model):
    """ASHA (Li et al. 2020) on ``time_attr``; stops the weakest trials at each rung."""

    known_keys: ClassVar[str] = "ASHA takes brackets, grace_period, max_t, reduction_factor, time_attr"
    type: Literal["asha"]
    time_attr: Literal["step", "training_iteration", "time_total_s"] = "step"
    max_t: Annotated[StrictInt, Field(ge=1)] | None = None
    """The longest a trial runs; default: ``train.total_steps``."""
    grace_period: Annotated[StrictInt, Field(ge=1)] | None = None
    """The shortest a trial runs before it can be stopped; default: ``train.eval_interval``."""
    reduction_factor: Number = 3
    brackets: Annotated[StrictInt, Field(ge=1)] = 1

    @field_validator("reduction_factor")
    @classmethod
    def _above_one(cls, v: float) -> float:
        if not v > 1:
            raise _fail(f"must be a number > 1, got {v!r}")
        return v


class FifoScheduler(_Model):
    """Every trial runs to its end (Tune's default)."""

    known_keys: ClassVar[str] = "the fifo scheduler takes none"
    type: Literal["fifo"]


Scheduler = Annotated[AshaScheduler | FifoScheduler, Field(discriminator="type")]


class Searcher(_Model):
    type: Literal["basic", "random", "grid", "optuna"]
    """basic (= random, grid): Tune's grid + random variants; optuna when installed."""
    seed: StrictInt | None = None


class Resources(_Model):
    known_keys: ClassVar[str] = ("driver_cpus, strategy; the actors' resources come from the config's runtime "
                                 "section")
    driver_cpus: Number = 0.1
    """CPUs of each trial's own process (bundle 0 of its placement group)."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @field_validator("driver_cpus")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise _fail(f"must be a number > 0, got {v!r}")
        return v


# ---------------------------------------------------------------------------------------------------------
# Arms and datasets: trials whose configs come from different presets.


class Arm(_Model):
    """One preset of the comparison: a train config file and dotted overrides of it."""

    base: str = Field(min_length=1)
    """A train config, relative to the sweep file; ``{env}`` stands for each entry of ``datasets:``."""
    set: dict[str, Any] = Field(default_factory=dict)
    """Dotted config keys of this arm only (``agent.alpha: 2.0``); a key of ``common:`` may not be repeated."""


class DatasetEntry(_Model):
    env: Literal[ENV_KEYS]  # type: ignore[valid-type]
    """The environment key; ``{env}`` in an arm's base becomes it."""
    dataset: str = Field(min_length=1)
    """A dataset as ``data.dataset`` takes it (a path, a D4RL name looked up in ``$D4RL_DATASET_DIR``, ...)."""


# ---------------------------------------------------------------------------------------------------------
# The file.


class SweepFile(_Model):
    """A sweep file; the config sections it carries inline (without ``arms:``) are kept in ``config_sections``."""

    name: str | None = None
    """Tune experiment name: <storage_path>/<name>; default: the file's stem."""
    base: str | None = None
    """The train config of every trial, relative to this file (without ``arms:``)."""
    arms: dict[str, Arm] | None = None
    """Named presets; every trial runs one of them (crossed with ``datasets:``, the search and ``seeds:``)."""
    datasets: list[DatasetEntry] | None = Field(default=None, min_length=1)
    """Datasets crossed with every arm (or with the base), in order: all trials of the first come first."""
    common: dict[str, Any] | None = None
    """Dotted config keys applied to every arm (with ``arms:``; the same budget and protocol for all)."""
    search: dict[str, AnyDistribution] | None = None
    """Dotted config keys -> one distribution each."""
    seeds: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(default=None, min_length=1)
    """A grid over ``seed``: every point of the search runs every seed."""
    metric: str = "final/normalized_score"
    """What the ranking (and a scheduler or searcher) uses."""
    mode: Literal["min", "max"] = "max"
    num_samples: Annotated[StrictInt, Field(ge=1)] = 1
    """Repeats of the grid (samples of the non-grid distributions)."""
    max_concurrent_trials: Annotated[StrictInt, Field(ge=0)] = 0
    """0: as many as the resources allow."""
    max_failures: Annotated[StrictInt, Field(ge=-1)] = 0
    """Tune retries of a failed trial (from its last checkpoint); -1: without end."""
    scheduler: Scheduler | None = None
    searcher: Searcher | None = None
    resources: Resources | None = None
    storage_path: str | None = None
    """Where Tune keeps the experiment; default: <out_dir>/sweeps."""
    config_sections: dict[str, Any] = Field(default_factory=dict)
    """The train-config sections written inline (not a key of the file)."""

    @classmethod
    def keys_hint(cls) -> str:
        keys = [k for k in cls.model_fields if k != _SECTIONS]
        return f"sweep keys: {', '.join(keys)}; config sections: {', '.join(CONFIG_KEYS)}"

    @model_validator(mode="before")
    @classmethod
    def _split_sections(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        if _SECTIONS in raw:
            raise _fail(f"unknown key ({cls.keys_hint()})", key=_SECTIONS)
        sections = {k: v for k, v in raw.items() if k in CONFIG_KEYS}
        return {**{k: v for k, v in raw.items() if k not in CONFIG_KEYS}, _SECTIONS: sections}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(NAME_PATTERN, v):
            raise _fail(f"{v!r} must be a non-empty name of letters, digits, '_', '.', '-'")
        return v

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, v: dict[str, Arm] | None) -> dict[str, Arm] | None:
        if v is not None:
            if not v:
                raise _fail("expected at least one arm")
            for name in v:
                if not re.fullmatch(NAME_PATTERN, str(name)):
                    raise _fail(f"arm name {name!r} must be letters, digits, '_', '.', '-'")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise _fail(f"repeated seed in {v!r}")
        return v

    @field_validator("metric")
    @classmethod
    def _reported(cls, v: str) -> str:
        if not v.startswith(METRIC_NAMESPACES):
            raise _fail(f"{v!r} is not a reported metric (namespaces: {', '.join(METRIC_NAMESPACES)}); "
                        "e.g. final/normalized_score")
        return v


# ---------------------------------------------------------------------------------------------------------
# ValidationError -> one ConfigError line naming the dotted key.


def config_error(e: ValidationError) -> ConfigError:
    """The first error of ``e`` as ``<dotted key>: <problem>``."""
    err = e.errors(include_url=False)[0]
    ctx = err.get("ctx") or {}
    loc = tuple(err["loc"]) + ((ctx["key"],) if ctx.get("key") else ())
    key, model, union = _walk(loc)
    kind = err["type"]
    if kind == "sweep":
        return ConfigError(f"{key or 'sweep'}: {ctx['message']}")
    if kind == "extra_forbidden":
        hint = model.keys_hint() if model is not None else ""
        return ConfigError(f"{key}: unknown key" + (f" ({hint})" if hint else ""))
    if kind in ("union_tag_invalid", "union_tag_not_found") and union:
        disc = str(ctx.get("discriminator", "type")).strip("'")
        tags = ", ".join(union)
        if kind == "union_tag_invalid":
            return ConfigError(f"{key}.{disc}: {ctx.get('tag')!r} is not one of {tags}")
        return ConfigError(f"{key}: expected a mapping with a {disc} ({tags}), got {err['input']!r}")
    msg = err["msg"][:1].lower() + err["msg"][1:]
    return ConfigError(f"{key or 'sweep'}: {msg}, got {err['input']!r}")


def _walk(loc: tuple[Any, ...]) -> tuple[str, type[_Model] | None, list[str]]:
    """The dotted key of ``loc`` (union tags dropped, list items as ``[i]``), the model the last key belongs to,
    and the tags of the union at the end of ``loc`` (when it ends at one)."""
    key, tp, model = "", _unwrap(SweepFile), None
    for item in loc:
        members = _union_members(tp)
        if members:
            tp = _unwrap(members.get(str(item), Any))
            continue
        if isinstance(tp, type) and issubclass(tp, _Model):
            model = tp
            field = tp.model_fields.get(str(item))
            tp = _unwrap(field.annotation) if field is not None else Any
            key = f"{key}.{item}" if key else str(item)
        elif typing.get_origin(tp) in (list, tuple) and isinstance(item, int):
            args = typing.get_args(tp)
            tp = _unwrap(args[0]) if args else Any
            key = f"{key}[{item}]"
        elif typing.get_origin(tp) is dict:
            tp = _unwrap(typing.get_args(tp)[1])
            key = f"{key}.{item}" if key else str(item)
        else:
            key = f"{key}.{item}" if key else str(item)
            tp = Any
    return key, model, list(_union_members(tp))


def _unwrap(tp: Any) -> Any:
    """``Annotated[X, ...]`` -> X; ``X | None`` -> X."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _union_members(tp: Any) -> dict[str, Any]:
    """Tag -> member of a discriminated union of models ({} for anything else)."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return {}
    out: dict[str, Any] = {}
    for a in typing.get_args(tp):
        m = _unwrap(a)
        if not (isinstance(m, type) and issubclass(m, _Model)):
            return {}
        tags = [x.tag for x in getattr(a, "__metadata__", ()) if isinstance(x, Tag)]
        if not tags and "type" in m.model_fields:
            tags = list(typing.get_args(m.model_fields["type"].annotation))
        if not tags:
            return {}
        out[str(tags[0])] = m
    return out
