"""Validate raw provider JSON against an official SDK's pydantic models, with no unknown field.

The SDKs' models allow extra fields and their clients build results without validating, so a
client call alone proves little. ``strict`` validates the raw body with ``model_validate`` and
then walks the result: any field the SDK does not declare, at any depth, fails the test.
``model_validate(..., strict=True)`` cannot be used: Vapi's models run a ``mode="before"``
validator, after which strict mode refuses ISO date-time strings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import pydantic

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
