"""A small named registry: each kind is a name, a pydantic config model and a builder.

Data sources, heads, composers and bases methods are registries of this shape, so adding a kind is
one file that calls `register` (plus its test); nothing else is edited.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from taskvec.errors import ConfigError, format_validation_error

B = TypeVar("B", bound=Callable[..., Any])


@dataclass(frozen=True)
class Kind(Generic[B]):
    """One registered kind: `config` validates its options, `build` makes the thing from them."""

    name: str
    config: type[BaseModel]
    build: B
    doc: str = ""


class Registry(Generic[B]):
    """Kinds of one family by name, e.g. the data sources of a suite (`what` names the family in errors)."""

    def __init__(self, what: str, key: str = "kind"):
        self.what, self.key = what, key
        self._kinds: dict[str, Kind[B]] = {}

    def register(self, name: str, config: type[BaseModel], build: B, doc: str = "") -> Kind[B]:
        if name in self._kinds:
            raise ValueError(f"{self.what} {name!r} is already registered")
        kind = Kind(name, config, build, doc or (build.__doc__ or "").strip().split("\n")[0])
        self._kinds[name] = kind
        return kind

    def names(self) -> list[str]:
        return list(self._kinds)

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def get(self, name: str) -> Kind[B]:
        try:
            return self._kinds[name]
        except KeyError:
            raise ConfigError(f"unknown {self.what} {name!r}; known: {', '.join(self._kinds)}") from None

    def parse(self, value: Any) -> BaseModel:
        """Validate `{key: name, ...options}` (or an already-built config) into that kind's config.

        Meant for pydantic validators: errors come out as pydantic errors naming the inner key."""
        if isinstance(value, BaseModel):
            return value
        if not isinstance(value, Mapping) or self.key not in value:
            raise validation_error(f"a mapping with a '{self.key}' key: one of {', '.join(self._kinds)}")
        name = value[self.key]
        if name not in self._kinds:
            raise validation_error(f"unknown {self.what} {name!r}; known: {', '.join(self._kinds)}")
        try:
            return self._kinds[name].config(**value)
        except ValidationError as e:
            raise validation_error(format_validation_error(e)) from None


def validation_error(msg: str) -> PydanticCustomError:
    """A pydantic error carrying `msg` as is (raise it from a validator)."""
    return PydanticCustomError("kind", "{msg}", {"msg": msg})
