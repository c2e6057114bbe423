"""Configs from YAML files and ``--set KEY=VALUE`` overrides into typed dataclasses.

Every value is checked against its field's annotation (`coerce`), so that a wrong type is an
error naming the key, the value and what is allowed, not a failure far away in training.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any


def read_yaml(path: str | Path, overrides: list[str] | None) -> dict[str, Any]:
    """A YAML file as a dict, with ``key.sub=value`` overrides applied (values parsed as YAML).
    A syntax error names the file, the line and the column."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: {_yaml_problem(error)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must be a mapping of keys to values, got {data!r}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"--set {item!r} is not KEY=VALUE (e.g. --set train.learning_rate=3e-4)"
            )
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"--set {item!r}: {_yaml_problem(error)}") from None
    return data


def _yaml_problem(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem} (not valid YAML)"


def build_config(cls, data: Any, where: str = "", nested: dict[str, type] | None = None):
    """Fill a dataclass from a dict: unknown keys are errors that name them and the allowed
    ones, values are checked against the annotations, and ``nested`` sections (name ->
    dataclass) are built the same way."""
    if not isinstance(data, dict):
        raise ValueError(
            f"{where.rstrip('.') or 'the config'} must be a mapping of keys to values, got {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(where + k for k in unknown)}; "
            f"allowed{' in ' + where.rstrip('.') if where else ''}: {', '.join(fields)}"
        )
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing := [name for name in required if name not in data]:
        raise ValueError(f"missing required key {', '.join(where + k for k in missing)}")
    kwargs = {}
    for key, value in data.items():
        if nested and key in nested and not (value is None and fields[key].default is None):
            kwargs[key] = build_config(nested[key], value, f"{key}.")
        else:
            kwargs[key] = coerce(where + key, str(fields[key].type), value)
    return cls(**kwargs)


def coerce(name: str, annotation: str, value: Any) -> Any:
    """``value`` as the type ``annotation`` names (int, float, bool, str, their lists and
    tuples, each maybe ``| None``), or a ValueError naming the key. A string where a number
    belongs becomes that number: YAML 1.1 reads ``1e-05`` (no dot, as json.dumps writes it)
    as a string."""
    optional = annotation.endswith(" | None")
    kind = annotation.removesuffix(" | None")
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be given ({_allowed(kind)}), got null")
    for prefix, container in (("list[", list), ("tuple[", tuple)):
        if kind.startswith(prefix):
            item = kind[len(prefix) : -1].removesuffix(", ...")
            if not isinstance(value, list | tuple):
                value = [value] if container is list and item == "str" else value
            if not isinstance(value, list | tuple):
                raise ValueError(f"{name}={value!r} is not allowed; use {_allowed(kind)}")
            return container(coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value))
    if kind in ("int", "float"):
        number = value
        if isinstance(value, str):
            try:
                number = float(value) if kind == "float" else int(value)
            except ValueError:
                number = None
        ok = isinstance(number, int | float) and not isinstance(number, bool)
        if ok and kind == "int" and not float(number).is_integer():
            ok = False
        if ok and kind == "float" and not math.isfinite(number):
            ok = False
        if not ok:
            raise ValueError(f"{name}={value!r} is not allowed; use {_allowed(kind)}")
        return int(number) if kind == "int" else float(number)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is not allowed; use {_allowed(kind)}")
        return value
    if kind == "str":
        if isinstance(value, dict | list):
            raise ValueError(f"{name}={value!r} is not allowed; use {_allowed(kind)}")
        return str(value)
    return value  # a nested section or a type this function does not check


def _allowed(kind: str) -> str:
    return {
        "int": "an integer",
        "float": "a finite number",
        "bool": "true or false",
        "str": "a string",
    }.get(kind, "a list" if kind.startswith(("list", "tuple")) else kind)


def check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not value > 0:
            raise ValueError(f"{name}={value!r} is not allowed; use a number > 0")
