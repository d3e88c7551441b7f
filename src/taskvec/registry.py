"""A small named registry: each kind is a name, a pydantic config model and a builder.

Merge methods, composers, bases methods, data sources, heads and backbones are registries of this
shape, so adding a kind is one file that calls `register` (plus its test); nothing else is edited.
See docs/extending.md.

Built-in kinds are found by importing every module of the registry's `package` (no hand-kept list
of imports); kinds of other installed packages come from the registry's entry-point `group`. Both
are loaded lazily, the first time a name is looked up that is not registered yet, or when every
name is listed. An entry point is named like the kind and points to a `Kind` (or a function
returning one), or to a module (or a function) that registers the kind itself; an entry point
named like a preset points to a module or function that adds it (`add_preset`).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from taskvec.errors import ConfigError, format_validation_error

B = TypeVar("B", bound=Callable[..., Any])
K = TypeVar("K", bound="Kind[Any]")


@dataclass(frozen=True)
class Kind(Generic[B]):
    """One registered kind: `config` validates its options, `build` makes the thing from them.
    `presets` names ready-made option sets of this kind (e.g. the ablations of a composer)."""

    name: str
    config: type[BaseModel]
    build: B
    doc: str = ""
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class Registry(Generic[B]):
    """Kinds of one family by name, e.g. the data sources of a suite (`what` names the family in errors).

    `key` is the option naming the kind in a config mapping; `package` the dotted package whose
    modules register the built-in kinds; `group` the entry-point group of other packages' kinds."""

    def __init__(self, what: str, key: str = "kind", *, group: str | None = None, package: str | None = None):
        self.what, self.key, self.group, self.package = what, key, group, package
        self._kinds: dict[str, Kind[B]] = {}
        self._origin: dict[str, str] = {}  # kind name -> the package it came from, for kinds of other packages
        self._presets: dict[str, dict[str, Any]] = {}  # preset name -> {key: kind, **options}
        self._discovered = package is None

    # ------------------------------------------------------------------ registering

    def register(
        self,
        name: str,
        config: type[BaseModel],
        build: B,
        doc: str = "",
        *,
        presets: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Kind[B]:
        """Add the kind `name`: options validated by `config`, made by `build`, with named `presets`."""
        doc = doc or (build.__doc__ or "").strip().split("\n")[0]
        return self.add(Kind(name, config, build, doc, dict(presets or {})))

    def add(self, kind: K) -> K:
        """Add a ready-made kind (a `Kind` or a subclass of it)."""
        if kind.name in self._kinds:
            raise ValueError(f"{self.what} {kind.name!r} is already registered")
        taken = [p for p in kind.presets if p in self._presets]
        if taken:
            raise ValueError(f"{self.what} {kind.name!r}: preset {taken[0]!r} is already registered")
        self._kinds[kind.name] = kind
        for p, options in kind.presets.items():
            self._presets[p] = {self.key: kind.name, **options}
        return kind

    def add_preset(self, name: str, kind: str, options: Mapping[str, Any] | None = None) -> None:
        """Name a ready-made option set of the registered `kind` (its options are checked when used)."""
        if name in self._presets:
            raise ValueError(f"{self.what} preset {name!r} is already registered")
        self._presets[name] = {self.key: kind, **(options or {})}

    # ------------------------------------------------------------------ looking up

    def names(self) -> list[str]:
        """Every kind's name: the built-in ones and those of installed packages."""
        self.load()
        return list(self._kinds)

    def known(self) -> list[str]:
        """The names registered so far (for error messages: loads nothing)."""
        return list(self._kinds)

    def kinds(self) -> list[Kind[B]]:
        self.load()
        return list(self._kinds.values())

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name not in self._kinds:
            self._find(name)
        return name in self._kinds

    def get(self, name: str) -> Kind[B]:
        if name not in self._kinds:
            self._find(name)
        try:
            return self._kinds[name]
        except KeyError:
            raise ConfigError(f"unknown {self.what} {name!r}; known: {', '.join(self._kinds)}") from None

    def source(self, name: str) -> str:
        """The package kind `name` comes from ('taskvec' for the built-in ones)."""
        return self._origin.get(name, "taskvec")

    @property
    def presets(self) -> Mapping[str, Mapping[str, Any]]:
        """Every preset by name, as `{key: kind, **options}` (a live view: plugins' presets included)."""
        return _Presets(self)

    def preset(self, name: str, **overrides: Any) -> BaseModel:
        """The config of preset `name`, with top-level options overridden."""
        if name not in self.presets:
            raise ConfigError(f"unknown {self.what} preset {name!r}; known: {', '.join(self.presets)}")
        return self.get_config({**self._presets[name], **overrides})

    def get_config(self, value: Mapping[str, Any]) -> BaseModel:
        """`{key: name, ...options}` validated by that kind's config; errors name the bad option."""
        try:
            return self.parse(value)
        except PydanticCustomError as e:
            raise ConfigError(e.message()) from None

    def parse(self, value: Any) -> BaseModel:
        """Validate `{key: name, ...options}` (or an already-built config) into that kind's config.

        Meant for pydantic validators: errors come out as pydantic errors naming the inner key."""
        if isinstance(value, BaseModel):
            return value
        if not isinstance(value, Mapping) or self.key not in value:
            raise validation_error(f"a mapping with a '{self.key}' key: one of {', '.join(self.names())}")
        name = value[self.key]
        if name not in self:
            raise validation_error(f"unknown {self.what} {name!r}; known: {', '.join(self._kinds)}")
        try:
            return self._kinds[name].config(**value)
        except ValidationError as e:
            raise validation_error(format_validation_error(e)) from None

    # ------------------------------------------------------------------ loading

    def load(self, name: str | None = None) -> None:
        """Import the built-in kinds' modules and the kinds of other packages (once each): every
        entry point, or only those named `name`."""
        self._discover()
        for ep in self._entry_points():
            if name is None or ep.name == name:
                self._load(ep)

    def _find(self, name: str) -> None:
        """Load what may register `name`: the built-in modules, then the entry point of that name only."""
        self._discover()
        if name not in self._kinds:
            self.load(name)

    def _discover(self) -> None:
        if self._discovered or self.package is None:
            return
        self._discovered = True
        for module in modules_of(importlib.import_module(self.package)):
            importlib.import_module(module)

    def _entry_points(self) -> list[EntryPoint]:
        return list(entry_points(group=self.group)) if self.group else []

    def _load(self, ep: EntryPoint) -> None:
        package = ep.dist.name if ep.dist is not None else ep.module
        if self._origin.get(ep.name) == package:
            return  # loaded already
        where = f"{self.what} {ep.name!r} of package {package!r} (entry point {ep.value!r})"
        known = self._kinds.get(ep.name)
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, (Kind, ModuleType, type)):
                obj = obj()
        except Exception as e:
            raise ConfigError(f"{where}: cannot be loaded ({type(e).__name__}: {e})") from None
        if isinstance(obj, Kind):
            if obj.name != ep.name:
                raise ConfigError(f"{where}: the {self.what} it points to is named {obj.name!r}")
            if known is not None and known is not obj:
                raise ConfigError(f"{where}: the name is taken by package {self.source(ep.name)!r}")
            if ep.name not in self._kinds:
                try:
                    self.add(obj)
                except ValueError as e:
                    raise ConfigError(f"{where}: {e}") from None
        elif ep.name not in self._kinds and ep.name not in self._presets:
            raise ConfigError(
                f"{where}: expected a {self.what} (taskvec.registry.Kind), a function returning one, or a module "
                f"registering it; got {type(obj).__name__}"
            )
        self._origin[ep.name] = package


class _Presets(Mapping[str, Mapping[str, Any]]):
    """The presets of a registry, every kind loaded before they are read."""

    def __init__(self, registry: Registry[Any]):
        self._registry = registry

    def _all(self) -> dict[str, dict[str, Any]]:
        self._registry.load()
        return self._registry._presets

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __contains__(self, name: object) -> bool:
        return name in self._registry._presets or name in self._all()


def modules_of(package: ModuleType) -> list[str]:
    """The dotted names of the modules of `package` (not its sub-packages, not `__main__`)."""
    return [
        f"{package.__name__}.{m.name}"
        for m in pkgutil.iter_modules(package.__path__)
        if not m.ispkg and m.name != "__main__"
    ]


def validation_error(msg: str) -> PydanticCustomError:
    """A pydantic error carrying `msg` as is (raise it from a validator)."""
    return PydanticCustomError("kind", "{msg}", {"msg": msg})
