"""A strict validator for KubeRay custom resources, built from the CRDs' OpenAPI v3 schemas.

An API server silently drops fields its schema does not know, so a misspelt field would
deploy and be ignored; here every object without `x-kubernetes-preserve-unknown-fields`
rejects unknown properties. `nullable` becomes a null type, fields both required and
defaulted are not required (the server fills them before validating), and lists of type
`map` must have unique keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        defaulted = {k for k, v in schema["properties"].items() if "default" in v}
        if "required" in schema:
            out["required"] = [r for r in schema["required"] if r not in defaulted]
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _map_list_errors(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """Duplicate keys in `x-kubernetes-list-type: map` lists, which JSON Schema cannot express."""
    errors = []
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                errors += _map_list_errors(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            dupes = {k for k in seen if seen.count(k) > 1}
            errors += [f"{path}: duplicate {keys} = {list(d)}" for d in dupes]
        for i, item in enumerate(value):
            errors += _map_list_errors(schema["items"], item, f"{path}[{i}]")
    return errors


class KubeRayValidator:
    def __init__(self, crd_dir: Path) -> None:
        self.schemas: dict[str, tuple[dict, Any]] = {}
        for path in sorted(crd_dir.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
            raw = version["schema"]["openAPIV3Schema"]
            validator = jsonschema.Draft7Validator(strict(raw))
            self.schemas[crd["spec"]["names"]["kind"]] = (raw, validator)

    def errors(self, doc: dict[str, Any]) -> list[str]:
        kind = doc.get("kind")
        if doc.get("apiVersion") != "ray.io/v1" or kind not in self.schemas:
            return [f"no KubeRay v1 schema for {doc.get('apiVersion')}/{kind}"]
        raw, validator = self.schemas[kind]
        found = [
            f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
        return found + _map_list_errors(raw, doc, kind)
