"""Commands' options made from the settings groups (config.py), as TRL's HfArgumentParser
makes argparse flags from its dataclasses: one declaration per setting, read here.

    @app.command()
    @settings(sampling=Use(SamplingSettings, skip=("prompts_per_step",)))
    def rollout(sampling: SamplingSettings, output: str = "-"): ...

gives `rollout` one option per field of SamplingSettings: the flag (--field-name, or the
field's `flag`/`short`), the type, the default, the range and the choices from the field,
the help from its docstring, the --help section from the group's PANEL. The command body
receives the settings objects built from the options and checked (`check()`), so a bad
value is refused before the body runs, and so before anything is written.

Only typer's public API is used: a function signature (`inspect.Signature`) whose
parameters are `Annotated[type, typer.Option(...)]`, which typer reads like any other.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from grpoctl import config


@dataclasses.dataclass
class Use:
    """The fields of one settings class that a command takes as options.

    only/skip: field names taken (default: all that have a flag) or left out.
    defaults: this command's defaults where they differ from the field's (e.g. `rollout`'s
        vLLM engine has the GPU to itself: --gpu-memory-utilization 0.9, not loop's 0.4).
    flags: this command's names for a field's option (the first is shown first)."""

    cls: type
    only: tuple = ()
    skip: tuple = ()
    defaults: dict = dataclasses.field(default_factory=dict)
    flags: dict = dataclasses.field(default_factory=dict)

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(self.cls) if f.metadata.get("cli", True)
                and (not self.only or f.name in self.only) and f.name not in self.skip]

    def help(self, f: dataclasses.Field) -> str:
        """The field's help; a default this command overrides drops the field's note."""
        text = help_of(self.cls, f.name)
        return re.sub(r"\s*\[default: [^\]]*\]", "", text) if f.name in self.defaults else text

    def build(self, values: dict):
        """The settings object of the options' values (the other fields keep defaults)."""
        kwargs = {}
        for f in self.fields():
            value, meta = values[f.name], f.metadata
            if meta.get("invert"):
                value = not value
            elif meta.get("none") is not None and value == meta["none"]:
                value = None
            elif isinstance(value, (list, tuple)):  # click gives a tuple; none given: default
                value = list(value) if value else None
            if value is None and f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            kwargs[f.name] = value
        return self.cls(**kwargs)


# In config.py's source: a class, and a field of it followed by its docstring (the
# field's declaration may go on over lines indented deeper)
_CLASS = re.compile(r"^class (\w+)", re.M)
_FIELD_DOC = re.compile(r'^    (\w+):[^\n]*\n(?:        [^\n]*\n)*    """(.*?)"""', re.M | re.S)


@functools.lru_cache(maxsize=None)
def docstrings() -> dict[tuple[str, str], str]:
    """{(class, field): the field's docstring, on one line} of config.py. Dataclass fields
    keep no docstring at runtime, so config.py's source is read, once, when a command is
    built. Regular expressions, not `ast`: parsing the module took 10 to 70 ms of every
    start (`--help` included), this well under 1 ms; tests/test_settings.py checks that
    both find the same docstrings."""
    source = Path(config.__file__).read_text(encoding="utf-8")
    classes = list(_CLASS.finditer(source))
    docs = {}
    for cls, after in zip(classes, classes[1:] + [None]):
        body = source[cls.end():after.start() if after else len(source)]
        for field in _FIELD_DOC.finditer(body):
            docs[cls.group(1), field.group(1)] = " ".join(field.group(2).split())
    return docs


def help_of(cls: type, name: str) -> str:
    """A field's docstring, from the class that declares it (or a base of it)."""
    for klass in cls.__mro__:
        if (klass.__name__, name) in docstrings():
            return docstrings()[klass.__name__, name]
    return ""


def panel_of(cls: type, name: str) -> str:
    """The --help section of a field: the PANEL of the group that declares it (LoopConfig
    redeclares lr: UpdateSettings' section; UpdateConfig's own fields: its base's)."""
    for klass in cls.__mro__:
        if name in vars(klass).get("__annotations__", {}) and "PANEL" in vars(klass):
            return klass.PANEL
    return cls.PANEL


def names_of(f: dataclasses.Field, use: Use) -> list[str]:
    if f.name in use.flags:
        return list(use.flags[f.name])
    names = [f.metadata.get("flag", "--" + f.name.replace("_", "-"))]
    return names + ([f.metadata["short"]] if "short" in f.metadata else [])


def option_type(f: dataclasses.Field, hint):
    """The type typer converts the option's text to: Literal[choices] for a choice,
    list[str] for a repeatable option, Optional[...] where None is a value."""
    if "choices" in f.metadata:
        kind = Literal[config.choices_of(f)]
        return Optional[kind] if type(None) in typing.get_args(hint) else kind
    if f.metadata.get("invert") or f.metadata.get("none") is not None:
        return bool if f.metadata.get("invert") else Optional[str]
    if typing.get_origin(hint) is list:
        return Optional[hint]
    return hint


def parameter(f: dataclasses.Field, hint, use: Use) -> inspect.Parameter:
    meta = f.metadata
    default = use.defaults.get(f.name, f.default)
    if meta.get("invert"):
        default = False  # the flag turns the setting off
    elif f.default_factory is not dataclasses.MISSING:
        default = None
    kwargs = dict(help=use.help(f), rich_help_panel=panel_of(use.cls, f.name))
    for bound in ("min", "max"):  # click's range: closed bounds (an open one: check())
        if bound in meta and not meta.get(bound + "_open"):
            kwargs[bound] = meta[bound]
    if f.default_factory is not dataclasses.MISSING:
        kwargs["show_default"] = ", ".join(f.default_factory())
    option = typer.Option(*names_of(f, use), **kwargs)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[option_type(f, hint), option])


def settings(**uses: Use):
    """Decorator: the body's parameters named in `uses` become the options of the
    settings' fields; the body is called with the settings built and checked. The body's
    other parameters (arguments, its own options) stay as declared, in order."""
    def decorate(body):
        own_hints = typing.get_type_hints(body, include_extras=True)
        params, own = [], []
        for name, param in inspect.signature(body).parameters.items():
            if name in uses:
                hints = typing.get_type_hints(uses[name].cls)
                params += [parameter(f, hints[f.name], uses[name]) for f in uses[name].fields()]
            else:
                own.append(name)
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                                            annotation=own_hints.get(name, param.annotation)))

        @functools.wraps(body)
        def command(**values):
            built = {name: use.build(values) for name, use in uses.items()}
            for value in built.values():
                value.check()  # a bad value fails here, before the body imports or writes
            return body(**built, **{name: values[name] for name in own})

        del command.__wrapped__  # typer reads the signature below, not the body's
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.uses = uses  # for scripts/make_docs.py
        return command
    return decorate


def flags_given(ctx: typer.Context, settings, skip: tuple = ()) -> dict:
    """{field: (flag, value)} for the fields of `settings` named on the command line (what
    `loop --resume` compares with the run's saved settings); options are named as their
    fields, so the command's own options (not fields) are left out, as are `skip`."""
    given = {}
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)  # an enum typer does not export: by name
        if param.name in skip or not hasattr(settings, param.name) or \
                getattr(source, "name", None) != "COMMANDLINE":
            continue
        given[param.name] = (param.opts[0], getattr(settings, param.name))
    return given


def refuse_non_finite(command):
    """Every float option of every command of `command` (the app's click group) refuses
    NaN and infinity as a flag error.

    typer's float options (and their min/max bounds) let "nan" and "inf" through, and a
    NaN then surfaces far from its flag (as a NaN loss, or an error about a record).
    One rule for all of them, so a new option is covered too: each parameter's
    callback (click's public hook, called with the converted value, in every typer
    version) refuses a float value that is not finite. No option has a callback of
    its own; one would still run, after the check.
    """
    for sub in getattr(command, "commands", {}).values():
        for param in sub.params:
            if not getattr(param.callback, "refuses_non_finite", False):
                param.callback = _refusing_non_finite(param.callback)
    return command


def _refusing_non_finite(callback):
    def finite(ctx, param, value):
        if isinstance(value, float) and not math.isfinite(value):
            raise typer.BadParameter(f"{str(value)!r} is not a finite number", ctx=ctx,
                                     param=param)
        return value if callback is None else callback(ctx, param, value)
    finite.refuses_non_finite = True
    return finite
