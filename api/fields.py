"""Unknown fields in request bodies, decided per dialect (README, "Unknown fields"):

- closed schemas (the Sandbox and job-sessions dialects: ``extra="forbid"``) refuse a body with a
  field they do not know (422 / 400), and name the field they probably meant;
- open schemas (Backend.AI and Jupyter: ``extra="allow"``, because their real clients send fields
  this server has no use for) accept the body and list the fields nobody knows in a ``Warning``
  header. Fields real clients send that we ignore on purpose are listed on the model, as
  ``ignored_fields``, so they draw no warning.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from pydantic import BaseModel, ValidationError

WARNING_HEADER = "Warning"


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the fields in ``model`` (and its nested models) that nobody declared."""
    known: frozenset[str] = getattr(type(model), "ignored_fields", frozenset())
    found = [prefix + key for key in (model.model_extra or {}) if key not in known]
    for name in type(model).model_fields:
        value = getattr(model, name, None)
        if isinstance(value, BaseModel):
            found += unknown_fields(value, f"{prefix}{name}.")
    return found


MAX_NAMED = 20  # a body of 10k unknown keys must not make a 10k-name header


def warning(fields: list[str]) -> str:
    """A ``Warning`` header value (RFC 7234 code 299: a persistent warning)."""
    # A header carries no control character and, in practice, ASCII only; a quoted-string no
    # bare quote: each name as a JSON string body (\u escapes), cut to a readable length.
    shown = [json.dumps(name[:64])[1:-1] for name in fields[:MAX_NAMED]]
    more = f" and {len(fields) - MAX_NAMED} more" if len(fields) > MAX_NAMED else ""
    return f'299 kernel-bridge "Unknown fields ignored: {", ".join(shown)}{more}"'


def describe_validation(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line naming every field that failed, and what a misspelt field probably meant."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        text = f"{where}: {err['msg']}"
        if err["type"] == "extra_forbidden" and model is not None:
            text = f"{where}: unknown field" + _did_you_mean(str(err["loc"][-1]), model)
        parts.append(text)
    return "; ".join(parts)


def _did_you_mean(name: str, model: type[BaseModel]) -> str:
    names: list[str] = []
    _collect(model, names)
    close = difflib.get_close_matches(name, names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"


def _collect(model: Any, names: list[str]) -> None:
    fields = getattr(model, "model_fields", None)
    if fields is None:
        return
    for key, info in fields.items():
        if key == "root":  # a RootModel (a list of items): its items' fields
            for arg in getattr(info.annotation, "__args__", ()):
                _collect(arg, names)
            continue
        names.append(key)
