"""The protocol's JSON Schema, loaded for tests: as published, and strict (every field a message carries must be
one the schema names), which is how messages from a running agent are checked against the document."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Final

import jsonschema

REPOSITORY: Final = Path(__file__).resolve().parent.parent
SCHEMA_FILE: Final = REPOSITORY / "docs" / "protocol" / "schema" / "sct-edge-1.4.schema.json"
VECTORS_FILE: Final = REPOSITORY / "docs" / "protocol" / "vectors" / "sct-edge-1.4.vectors.jsonl"
#: The previous minor's artefacts, as published: what a 1.3 receiver was built against.
SCHEMA_1_3_FILE: Final = REPOSITORY / "docs" / "protocol" / "schema" / "sct-edge-1.3.schema.json"
VECTORS_1_3_FILE: Final = REPOSITORY / "docs" / "protocol" / "vectors" / "sct-edge-1.3.vectors.jsonl"
MAKE_VECTORS: Final = REPOSITORY / "docs" / "protocol" / "make_vectors.py"


def load_schema(path: Path = SCHEMA_FILE) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def _forbid_unnamed(node: object) -> None:
    """Every object schema that names its properties gets ``unevaluatedProperties: false`` (draft 2020-12 sees
    the properties its ``allOf`` parts name too), so a field the document does not specify fails validation."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            node["unevaluatedProperties"] = False
        for value in node.values():
            _forbid_unnamed(value)
    elif isinstance(node, list):
        for value in node:
            _forbid_unnamed(value)


def validator(*, strict: bool, path: Path = SCHEMA_FILE) -> jsonschema.Draft202012Validator:
    schema = load_schema(path)
    if strict:
        schema = copy.deepcopy(schema)
        _forbid_unnamed(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def schema_errors(check: jsonschema.Draft202012Validator, header: dict[str, Any]) -> list[str]:
    """Every way ``header`` fails the schema, each with the path of the offending value."""
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(header)'}: {error.message}"
        for error in check.iter_errors(header)
    ]
