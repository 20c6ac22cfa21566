"""Run parameters, typed once per kind: bounds, defaults, help and CLI flags on the fields.

Each kind declares one ``Params`` model (``engine/jobs/<kind>/params.py``); its ``prepare``
builds it, the CLI adds its flags from it (``add_param_flags``) and the console takes its
widgets' bounds and defaults from it (``bounds``, ``default``). Every problem with a run
parameter is one ``ParamError`` that names its field, so the CLI can name the flag and a
console page can show the message under the field — nobody parses messages.

Field metadata beyond pydantic's (description, ge/le/gt, default) rides in
``json_schema_extra`` through ``param()``: the CLI ``flag``, a ``label`` and ``unit`` for
messages, the ``setting`` whose value is the default when the run does not say, a
``missing`` message, ``metavar``, ``multiple`` (a repeatable flag) and ``cli=False`` for
parameters only programs give.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from types import NoneType, UnionType
from typing import Annotated, Any, ClassVar, Literal, Self, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

BATCH_SIZE = 50
MAX_BATCH_SIZE = 100_000

# Shared with ``engine.settings.Settings`` (its FETCHFLEET_BATCH_SIZE is a run's default).
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)]


class ParamError(ValueError):
    """A run parameter that cannot be used. ``field`` is the parameter's name (None for a
    problem of the whole run); ``message`` says what to do without naming a flag, so a page
    shows it under the field; ``str()`` is the CLI's text, which names the flag. ``value``,
    when set, is quoted before the message (``--ids x.txt: no such file``). Several problems
    found at once travel in one error: ``problems`` lists each."""

    def __init__(
        self,
        message: str,
        field: str | None = None,
        *,
        flag: str | None = None,
        value: Any = None,
        more: Sequence[ParamError] = (),
    ) -> None:
        self.message = message
        self.field = field
        self.flag = flag
        self.value = value
        self.more = tuple(more)
        super().__init__(str(self))

    @property
    def problems(self) -> tuple[ParamError, ...]:
        return (self, *self.more)

    def text(self) -> str:
        """This problem for a form: the value (if any) and the message, no flag."""
        return self.message if self.value is None else f"{self.value}: {self.message}"

    def cli_text(self) -> str:
        if self.flag is None:
            return self.text()
        if self.value is None:
            return f"{self.flag}: {self.message}"
        return f"{self.flag} {self.value}: {self.message}"

    def by_field(self) -> dict[str | None, str]:
        """The first message of each field (None: the run as a whole)."""
        out: dict[str | None, str] = {}
        for p in self.problems:
            out.setdefault(p.field, p.text())
        return out

    def __str__(self) -> str:
        return "; ".join(p.cli_text() for p in self.problems)

    def __reduce__(self) -> tuple[Any, ...]:  # keyword-only fields survive pickling
        return (_rebuild, (self.message, self.field, self.flag, self.value, self.more))


def _rebuild(
    message: str, field: str | None, flag: str | None, value: Any, more: tuple[ParamError, ...]
) -> ParamError:
    return ParamError(message, field, flag=flag, value=value, more=more)


def param(
    default: Any = PydanticUndefined,
    *,
    description: str,
    flag: str | None = None,
    label: str | None = None,
    unit: str | None = None,
    setting: str | None = None,
    missing: str | None = None,
    metavar: str | None = None,
    multiple: bool = False,
    cli: bool = True,
    **constraints: Any,
) -> Any:
    """A parameter field: pydantic's ``Field`` plus what the CLI and the messages need."""
    extra = {
        "flag": flag,
        "label": label,
        "unit": unit,
        "setting": setting,
        "missing": missing,
        "metavar": metavar,
        "multiple": multiple or None,
        "cli": None if cli else False,
    }
    return Field(
        default,
        description=description,
        json_schema_extra={k: v for k, v in extra.items() if v is not None},
        **constraints,
    )


def meta(info: FieldInfo) -> dict[str, Any]:
    extra = info.json_schema_extra
    return dict(extra) if isinstance(extra, dict) else {}


def bounds(model: type[BaseModel], name: str) -> dict[str, float]:
    """The numeric bounds of a field: any of ``ge``, ``gt``, ``le``, ``lt``."""
    out: dict[str, float] = {}
    for m in model.model_fields[name].metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(annotated_types, key.capitalize())):
                out[key] = getattr(m, key)
    return out


class Params(BaseModel):
    """The base of every kind's parameters: immutable, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ClassVar[str] = ""

    @classmethod
    def flag(cls, name: str) -> str | None:
        info = cls.model_fields[name]
        m = meta(info)
        if m.get("cli") is False:
            return None
        return m.get("flag") or "--" + name.replace("_", "-")

    @classmethod
    def label(cls, name: str) -> str:
        return meta(cls.model_fields[name]).get("label") or name.replace("_", " ")

    @classmethod
    def default(cls, name: str, settings: Any = None) -> Any:
        """The value a run gets when it does not give this one (its setting first)."""
        info = cls.model_fields[name]
        setting = meta(info).get("setting")
        if settings is not None and setting and getattr(settings, setting, None) is not None:
            return getattr(settings, setting)
        return None if info.default is PydanticUndefined else info.default

    @classmethod
    def error(cls, name: str | None, message: str, value: Any = None) -> ParamError:
        """A ParamError for one field, naming its CLI flag."""
        return ParamError(message, name, flag=cls.flag(name) if name else None, value=value)

    @classmethod
    def build(cls, data: Mapping[str, Any], settings: Any = None) -> Self:
        """Validate run parameters. None or "" means "not given": the field's setting (when
        ``settings`` is passed), else its default. Raises ParamError naming each field."""
        given = {k: v for k, v in data.items() if v is not None and v != ""}
        if settings is not None:
            for name, info in cls.model_fields.items():
                setting = meta(info).get("setting")
                if name not in given and setting and getattr(settings, setting, None) is not None:
                    given[name] = getattr(settings, setting)
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            raise param_error(exc, cls) from None

    def stored(self) -> dict[str, Any]:
        """The JSON-able dict stored with the run."""
        return self.model_dump(mode="json")


# --- pydantic's errors as ParamErrors --------------------------------------------------------


def _num(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}" if isinstance(x, float) else str(x)


def _bound_message(model: type[Params], name: str, err: Mapping[str, Any]) -> str | None:
    """``the batch size must be between 1 and 100,000 items per task, not 0``."""
    unit = meta(model.model_fields[name]).get("unit")
    label, u, b = model.label(name), f" {unit}" if unit else "", bounds(model, name)
    got = err.get("input")
    not_ = f", not {_num(got)}" if isinstance(got, int | float) else ""
    kind = err["type"]
    if kind in ("greater_than_equal", "less_than_equal") and "ge" in b and "le" in b:
        return f"{label} must be between {_num(b['ge'])} and {_num(b['le'])}{u}{not_}"
    if kind == "greater_than_equal":
        return f"{label} must be {_num(b['ge'])}{u} or more{not_}"
    if kind == "greater_than":
        return f"{label} must be more than {_num(b['gt'])}{u}{not_}"
    if kind == "less_than_equal":
        return f"{label} must be at most {_num(b['le'])}{u}{not_}"
    return None


def _message(model: type[Params], name: str | None, err: Mapping[str, Any]) -> ParamError:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), ParamError):
        inner: ParamError = ctx["error"]
        return model.error(inner.field or name, inner.message, inner.value)
    if name is None:
        if kind == "extra_forbidden":
            return ParamError(f"unknown parameter {err['loc'][0]!r}")
        return ParamError(str(ctx.get("error") or err["msg"]))
    label = model.label(name)
    if kind == "missing":
        return model.error(
            name, meta(model.model_fields[name]).get("missing") or f"{label} is required"
        )
    if kind == "value_error":
        return model.error(name, str(ctx["error"]))
    if msg := _bound_message(model, name, err):
        return model.error(name, msg)
    if kind == "literal_error":
        return model.error(
            name, f"{label} must be one of {ctx.get('expected', '')}", err.get("input")
        )
    if kind.startswith(("int_", "float_")):
        whole = "a whole number" if kind.startswith("int_") else "a number"
        return model.error(name, f"{label} must be {whole}", err.get("input"))
    return model.error(name, f"{label}: {err['msg'][0].lower()}{err['msg'][1:]}")


def param_error(exc: ValidationError, model: type[Params]) -> ParamError:
    """Pydantic's errors as one ParamError (each problem in ``problems``), field by field."""
    found: list[ParamError] = []
    for err in exc.errors():
        loc = err["loc"]
        name = loc[0] if loc and isinstance(loc[0], str) and loc[0] in model.model_fields else None
        if err["type"] == "extra_forbidden":
            name = None
        found.append(_message(model, name, err))
    first, *rest = found or [ParamError(str(exc))]
    return ParamError(first.message, first.field, flag=first.flag, value=first.value, more=rest)


# --- the CLI --------------------------------------------------------------------------------


def _plain(annotation: Any) -> tuple[Any, tuple[str, ...] | None]:
    """(the argparse type, the choices) of a field's annotation."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not NoneType]
        return _plain(args[0]) if len(args) == 1 else (str, None)
    if origin is Annotated:
        return _plain(get_args(annotation)[0])
    if origin is Literal:
        return str, tuple(str(a) for a in get_args(annotation))
    if annotation in (int, float):
        return annotation, None
    return str, None


def _cli_fields(model: type[Params], exclude: Iterable[str]) -> Iterable[tuple[str, str]]:
    skip = set(exclude)
    for name in model.model_fields:
        flag = model.flag(name)
        if flag is not None and name not in skip:
            yield name, flag


def flag_help(model: type[Params], name: str) -> str:
    """The field's description and its default (and the setting that changes it)."""
    info = model.model_fields[name]
    m = meta(info)
    text = (info.description or "").replace("%", "%%")
    default = None if info.default is PydanticUndefined else info.default
    parts = []
    if default is not None and default != () and default != []:
        parts.append(f"default {_num(default)}")
    if name == "stop_when":  # the kind's defaults, a class attribute (engine.stop_rules)
        parts.append(f"default {' '.join(getattr(model, 'default_stop_rules', ())) or 'none'}")
    if m.get("setting"):
        parts.append(f"env FETCHFLEET_{m['setting'].upper()}")
    return f"{text} ({'; '.join(parts)})" if parts else text


def add_param_flags(
    parser: argparse.ArgumentParser, model: type[Params], exclude: Iterable[str] = ()
) -> None:
    """One flag per CLI field of ``model``: name, type, choices, help and default from the
    field. The parser's default is None ("not given") so ``prepare`` applies the model's."""
    for name, flag in _cli_fields(model, exclude):
        info = model.model_fields[name]
        m = meta(info)
        kw: dict[str, Any] = {"help": flag_help(model, name), "default": None}
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
        if m.get("multiple"):
            kw["action"] = "append"
        else:
            kind, choices = _plain(info.annotation)
            kw["type"] = kind
            if choices:
                kw["choices"] = choices
        parser.add_argument(flag, **kw)


def params_from_args(
    model: type[Params], args: argparse.Namespace, exclude: Iterable[str] = ()
) -> dict[str, Any]:
    """The parameters given on the command line, by field name (flags not given left out)."""
    out: dict[str, Any] = {}
    for name, flag in _cli_fields(model, exclude):
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            out[name] = value
    return out


class TaskParams(Params):
    """What every queued kind shares: the task shape, and the rules that stop a run on its
    own (``engine.stop_rules``): the kind's defaults, overridden metric by metric."""

    # what this kind measures for stop rules, and the rules its runs get by default
    stop_metrics: ClassVar[tuple[str, ...]] = ("error_ratio", "no_progress")
    default_stop_rules: ClassVar[tuple[str, ...]] = ("no_progress>15m",)

    batch_size: BatchSize = param(
        BATCH_SIZE,
        description="items per task",
        label="the batch size",
        unit="items per task",
        setting="batch_size",
    )
    stop_when: tuple[str, ...] = param(
        (),
        description="stop the run (resumable) when METRIC>THRESHOLD[/WINDOW] holds, e.g. "
        "error_ratio>0.5/200 (last 200 items), blocked_ratio>0.8/10m, http_429>50/5m, "
        "browser_s>3600, proxy_mb>500, no_progress>15m; repeatable; replaces the kind's "
        "default for its metric; METRIC=off drops one, none drops all (README: Automatic stop "
        "rules)",
        flag="--stop-when",
        metavar="RULE",
        label="the stop rules",
        multiple=True,
        validate_default=True,
    )

    @field_validator("stop_when", mode="before")
    @classmethod
    def _stop_when(cls, value: Any) -> tuple[str, ...]:
        from engine.stop_rules import resolve_rules

        return resolve_rules(value, cls.default_stop_rules, cls.stop_metrics)


def timeout_param(default: float, description: str, setting: str | None = None) -> Any:
    """``timeout_s`` of the kinds that have one (``--timeout``)."""
    return param(
        default,
        description=description,
        flag="--timeout",
        metavar="SECONDS",
        label="the timeout",
        unit="seconds",
        setting=setting,
        gt=0,
    )
