"""Validate raw provider JSON against an official SDK's pydantic models, with no unknown field.

The SDKs' models allow extra fields and their clients build results without validating, so a
client call alone proves little. ``strict`` validates the raw body with ``model_validate`` and
then walks the result: any field the SDK does not declare, at any depth, fails the test.
``model_validate(..., strict=True)`` cannot be used: Vapi's models run a ``mode="before"``
validator, after which strict mode refuses ISO date-time strings.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from typing import Any, TypeVar

import httpx
import pydantic
import typing_extensions

M = TypeVar("M", bound=pydantic.BaseModel)


def extras(obj: object, path: str = "$") -> Iterator[str]:
    """The paths of every field present in ``obj`` that its model does not declare."""
    if isinstance(obj, pydantic.BaseModel):
        for key in obj.model_extra or {}:
            yield f"{path}.{key}"
        for name in type(obj).model_fields:
            yield from extras(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, list | tuple):
        for i, item in enumerate(obj):
            yield from extras(item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from extras(item, f"{path}.{key}")


def strict(model: type[M], data: Any, allowed: frozenset[str] = frozenset()) -> M:
    """``model`` validated from ``data``; fails on any undeclared field outside ``allowed``."""
    parsed = model.model_validate(data)
    unknown = sorted(set(extras(parsed)) - allowed)
    assert not unknown, f"fields the SDK does not declare: {unknown}"
    return parsed


def defer_vapi_schemas() -> None:
    """Make ``vapi``'s models build their schemas on first use instead of at import.

    The SDK rebuilds every one of its ~1,500 models at import (``update_forward_refs``), about
    40 s of CPU with pydantic 2.12; deferred, the models a test validates cost about 10 s.
    Call before the first ``import vapi.types``.
    """
    import vapi.core.pydantic_utilities as utilities
    import vapi.core.unchecked_base_model as unchecked

    utilities.UniversalBaseModel.model_config["defer_build"] = True
    unchecked.UncheckedBaseModel.model_config["defer_build"] = True
    utilities.update_forward_refs = _no_rebuild  # type: ignore[assignment]


def _no_rebuild(model: type[pydantic.BaseModel], **namespace: Any) -> None:
    """Forward references resolve when the deferred schema is first built."""


def typed_dict_extras(schema: Any, value: Any, path: str = "$") -> Iterator[str]:
    """The paths of keys in ``value`` that the SDK's request ``TypedDict`` does not declare.

    Request types are ``TypedDict`` (Retell's Stainless SDK): ``TypeAdapter`` checks the
    values but ignores unknown keys, so this walks the keys, through Optional, Union and
    Iterable annotations (a union member is the one whose keys fit best).
    """
    candidates = [t for t in _members(schema) if typing_extensions.is_typeddict(t)]
    if isinstance(value, dict) and candidates:
        hints = [typing_extensions.get_type_hints(t) for t in candidates]
        best = min(hints, key=lambda h: len(set(value) - set(h)))
        for key, item in value.items():
            if key not in best:
                yield f"{path}.{key}"
            else:
                yield from typed_dict_extras(best[key], item, f"{path}.{key}")
    elif isinstance(value, list | tuple):
        for member in _members(schema):
            for arg in typing.get_args(member) or ():
                for i, item in enumerate(value):
                    yield from typed_dict_extras(arg, item, f"{path}[{i}]")


def _members(tp: Any) -> list[Any]:
    """``tp`` with Optional/Union/Required/Annotated unwrapped into its concrete members."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    if origin in (typing.Annotated, typing_extensions.Required, typing_extensions.NotRequired):
        return _members(typing.get_args(tp)[0])
    return [tp]


class Recorder:
    """The raw responses an SDK's httpx client received, bodies read."""

    def __init__(self) -> None:
        self.responses: list[httpx.Response] = []

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        self.responses.append(response)

    @property
    def last(self) -> Any:
        return self.responses[-1].json()
