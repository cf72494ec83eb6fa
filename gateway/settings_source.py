"""Where a setting's value came from, and what an unknown key probably meant: the words that
make a settings error actionable.

A value comes from an environment variable (``VLLM_GATEWAY_...``, the longest one whose path
holds the setting or lies under it), else from the YAML file, else it is the default. An
unknown key is compared with the keys allowed at its place and the closest is suggested.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

ENV_PREFIX = "VLLM_GATEWAY_"

Loc = Sequence[str | int]


def source_of(loc: Loc, config: Path | None, environ: Mapping[str, str]) -> str:
    """``"environment VLLM_GATEWAY_X__Y"``, ``"file PATH"`` or ``"default"``."""
    path = [str(part).lower() for part in loc]
    best = ""
    for name in environ:
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name.removeprefix(ENV_PREFIX).lower().split("__")
        # The variable sets this setting or a section holding it, or it made this key up.
        same = min(len(parts), len(path))
        if path[:same] == parts[:same] and len(name) > len(best):
            best = name
    if best:
        return f"environment {best}"
    return f"file {config}" if config is not None else "default"


def describe(
    exc: ValidationError, root: type[BaseModel], config: Path | None, environ: Mapping[str, str]
) -> str:
    """One line per error: the setting, where its value came from, what is wrong, and for an
    unknown key the known key it most resembles."""
    lines = []
    for err in exc.errors():
        loc = err["loc"]
        where = ".".join(str(part) for part in loc) or "(top level)"
        source = source_of(loc, config, environ)
        if err["type"] == "extra_forbidden":
            hint = suggestion(root, loc)
            guess = f"; did you mean {hint}?" if hint else ""
            lines.append(f"{where} ({source}): unknown key{guess}")
        else:
            lines.append(f"{where} ({source}): {err['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def suggestion(root: type[BaseModel], loc: Loc) -> str:
    """The dotted name of the known key closest to the unknown ``loc[-1]``; "" if none is."""
    model = _model_at(root, loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    if not close:
        return ""
    return ".".join([*(str(part) for part in loc[:-1]), close[0]])


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    annotation: Any = root
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: _model_in finds the item's model in the list type
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[-1]  # a mapping's key: its value's place
            continue
        model = _model_in(annotation)
        if model is None or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
    return _model_in(annotation)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
