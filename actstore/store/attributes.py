"""Group attributes as any Zarr, xarray or netCDF user can take them.

netCDF attributes are strings and numbers, so xarray's ``to_netcdf`` refuses a dataset whose attributes
hold None, dicts or lists of strings. actstore keeps such values (recipe, provenance, progress, access,
history) as JSON text instead, and names them in the ``json_attributes`` attribute (space-separated, as
CF's ``coordinates``): plain readers see strings they can ``json.loads``, actstore reads the values back.
Groups written before this convention hold raw JSON values and read as they are.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import zarr

JSON_ATTRS = "json_attributes"


def read_attr(group: zarr.Group, name: str, default: Any = None) -> Any:
    """One attribute, decoded; ``default`` when absent."""
    stored = group.attrs.get(name)
    if stored is None:
        return default
    return json.loads(stored) if name in _json_names(group.attrs) else stored


def read_attrs(group: zarr.Group) -> dict[str, Any]:
    """Every attribute, decoded, without the ``json_attributes`` bookkeeping."""
    stored = group.attrs.asdict()
    names = _json_names(stored)
    return {k: json.loads(v) if k in names else v for k, v in stored.items() if k != JSON_ATTRS}


def write_attrs(group: zarr.Group, values: dict[str, Any]) -> None:
    """Set ``values`` (others kept) in one write of the group's metadata, so a commit stays atomic."""
    group.attrs.update(encode(values, group.attrs.asdict()))


def encode(values: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``values`` as stored over the attributes ``current``: strings and numbers as they are, anything else
    as JSON text, with ``json_attributes`` updated to name them."""
    names = _json_names(current)
    stored = {}
    for name, value in values.items():
        value = value.item() if isinstance(value, np.generic) else value
        if isinstance(value, (str, int, float)):  # bool is an int: netCDF keeps it as 1 or 0
            stored[name] = value
            names.discard(name)
        else:
            stored[name] = json.dumps(value, default=_plain)
            names.add(name)
    return {**stored, JSON_ATTRS: " ".join(sorted(names))}


def as_stored(value: Any) -> Any:
    """``value`` as it reads back after a write (tuples as lists, numpy values as Python ones): compare
    stored attributes with this, not with what was written."""
    return json.loads(json.dumps(value, default=_plain))


def _plain(value: Any) -> Any:
    """numpy scalars and arrays inside values, as JSON can hold them."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"cannot store a {type(value).__name__} as an attribute")


def _json_names(attrs: Any) -> set[str]:
    return set(str(attrs.get(JSON_ATTRS, "")).split())
