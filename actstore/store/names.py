"""Names of models and methods, which become folder names inside the store.

Validated names can never point outside the store root (no ``/``, no ``..``, no hidden names),
and are portable across file systems and object stores.
"""

from __future__ import annotations

import re

from actstore.store.errors import InvalidName, echo

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def validate_name(name: str, what: str = "name") -> str:
    """Return ``name`` unchanged if it is a safe single path component, else raise InvalidName."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} {echo(name)}: use 1-128 characters from letters, digits, '.', '_', '+', '-', "
            "starting with a letter or digit, without '..' or '/'"
        )
    return name


def safe_name(text: str) -> str:
    """Turn a model id such as ``org/model`` or a file path into a valid store name (``org--model``)."""
    cleaned = _UNSAFE.sub("-", text.strip().replace("/", "--")).strip(".-_+")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:128]
    return validate_name(cleaned or "model", "model name")
