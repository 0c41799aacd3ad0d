"""Components as plain data: the specs a model's plan records, and building components back from them.

A spec is ``{"_target_": "dotted.path", **arguments}``, the form MONAI's configs use for a component.
Training configs declare the components a plan records in MONAI's callable mode (``_mode_: callable``):
MONAI then hands over the constructor with its resolved arguments (``functools.partial``), which
:func:`spec_of` turns into the spec; :func:`build` instantiates a spec again, nested specs first.
MONAI's config machinery has no way back from a component to its config, hence this module.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pydoc
from collections.abc import Mapping
from typing import Any

from monai.utils import instantiate

from bundle.errors import OptionError


def public_target(obj: Any) -> str:
    """The shortest importable dotted name of a class or function (``monai.transforms.ScaleIntensityd``).

    Specs name a component by its public path, not the module it happens to be defined in, so a
    recorded plan survives moves inside a package that keeps its public names.
    """
    module, name = obj.__module__, obj.__qualname__
    parts = module.split(".")
    for end in range(1, len(parts) + 1):
        candidate = ".".join(parts[:end])
        if end == 1 and len(parts) > 1:
            continue  # never the bare top package (``torch.Adam`` does not exist, ``monai.X`` is ambiguous)
        try:
            if getattr(importlib.import_module(candidate), name, None) is obj:
                return f"{candidate}.{name}"
        except ImportError:
            continue
    return f"{module}.{name}"


def spec_of(component: Any, what: str) -> Any:
    """The plain, recordable form of ``component``: a spec for a callable-mode component, lists as lists.

    ``functools.partial`` (MONAI's callable mode with arguments) and a bare class or function (callable
    mode without arguments) become ``{"_target_": ..., **arguments}``, nested callable-mode arguments
    nested specs; numbers, strings, booleans, None, lists and mappings stay as they are. Anything else
    cannot be recorded by value: one sentence naming ``what`` (the config key).
    """
    if isinstance(component, functools.partial):
        if component.args:
            raise OptionError(f"{what}: give the component's arguments by name, not by position")
        arguments = {key: spec_of(value, f"{what}#{key}") for key, value in component.keywords.items()}
        return {"_target_": public_target(component.func), **arguments}
    if isinstance(component, type) or inspect.isfunction(component) or inspect.isbuiltin(component):
        if "<" in component.__qualname__:  # a lambda or a local function: not importable by name
            raise OptionError(f"{what}: {component.__name__} cannot be recorded by name; use an importable one")
        return {"_target_": public_target(component)}
    if component is None or isinstance(component, (bool, int, float, str)):
        return component
    if isinstance(component, Mapping):
        return {str(key): spec_of(value, f"{what}#{key}") for key, value in component.items()}
    if isinstance(component, (list, tuple)):
        return [spec_of(value, f"{what}#{i}") for i, value in enumerate(component)]
    raise OptionError(
        f"{what}: a {type(component).__name__} object cannot be recorded in the model's plan; declare it as a "
        "MONAI component in callable mode (`_mode_: callable`)"
    )


def build(spec: Any) -> Any:
    """Instantiate a spec (nested specs first), as MONAI's config parser instantiates ``_target_`` entries."""
    if isinstance(spec, list):
        return [build(item) for item in spec]
    if isinstance(spec, Mapping):
        arguments = {key: build(value) for key, value in spec.items() if key != "_target_"}
        if "_target_" not in spec:
            return arguments
        return instantiate(str(spec["_target_"]), "default", **arguments)
    return spec


def callable_mode(spec: Any) -> Any:
    """A spec as MONAI config content in callable mode (``_mode_: callable`` on every component in it)."""
    if isinstance(spec, list):
        return [callable_mode(item) for item in spec]
    if isinstance(spec, Mapping):
        content = {key: callable_mode(value) for key, value in spec.items()}
        return {**content, "_mode_": "callable"} if "_target_" in spec else content
    return spec


def same_component(a: Any, b: Any) -> bool:
    """Whether two specs describe the same component: targets compared as the objects they name."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return False
        for key in a:
            if key == "_target_":
                if a[key] != b[key] and pydoc.locate(str(a[key])) is not pydoc.locate(str(b[key])):
                    return False
            elif not same_component(a[key], b[key]):
                return False
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_component(x, y) for x, y in zip(a, b))
    return a == b
