"""Generates the ExplorerJob CRD from the pydantic models: ``python -m explorer_operator.crdgen > crds/...``.

pydantic's JSON Schema is turned into a structural OpenAPI v3 schema: references inlined, ``anyOf [X, null]`` made
``nullable``, free-form Kubernetes objects marked ``x-kubernetes-preserve-unknown-fields``, default factories turned
into defaults so the API server fills nested defaults, descriptions kept for ``kubectl explain``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from explorer_operator import admission, models

CRD_PATH = Path("crds") / f"{models.PLURAL}.{models.GROUP}.yaml"
DROPPED_KEYS = {"title", "$defs"}


class _KubeSchema(GenerateJsonSchema):
    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()  # type: ignore[call-arg]
            return (
                value.model_dump(mode="json", by_alias=True, exclude_none=True)
                if isinstance(value, BaseModel)
                else value
            )
        default = schema.get("default", NoDefault)
        return NoDefault if default is None else default


def _normalise(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline ``$ref``, turn ``anyOf [X, null]`` into ``nullable``, ``const`` into ``enum``, numeric exclusive bounds
    into the OpenAPI v3.0 boolean form."""
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _normalise({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    options = [o for o in node.get("anyOf", []) if o != {"type": "null"}]
    if len(options) == 1 and len(node["anyOf"]) == 2:
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        return {**_normalise({**options[0], **rest}, defs), "nullable": True}
    if "const" in node:
        node = {**{k: v for k, v in node.items() if k != "const"}, "enum": [node["const"]]}
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node[bound], bool):
            node = {**node, limit: node[bound], bound: True}
    return node


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Rewrite one pydantic JSON-schema node into its Kubernetes structural form."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in _normalise(node, defs).items():
        if key in DROPPED_KEYS or (key == "additionalProperties" and value is False):
            continue  # structural schemas prune unknown fields; kubectl's strict validation reports them
        if key == "properties":
            out[key] = {name: _structural(child, defs) for name, child in value.items()}
        elif key == "additionalProperties" and (value is True or value == {}):
            out["x-kubernetes-preserve-unknown-fields"] = True
        else:
            out[key] = _structural(value, defs)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, schema_generator=_KubeSchema, mode="validation")
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}))
    return schema


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "integer", "jsonPath": ".status.engines.ready", "description": "Engines ready"},
    {"name": "Desired", "type": "integer", "jsonPath": ".spec.engines.replicas", "description": "Engines desired"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Total", "type": "integer", "jsonPath": ".status.totalSteps", "priority": 1},
    {"name": "Policy", "type": "integer", "jsonPath": ".status.policyVersion", "description": "Policy version"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object, generated from ``models``."""
    spec_schema = openapi_schema(models.ExplorerJobSpec)
    spec_schema["x-kubernetes-validations"] = admission.crd_validations("spec")
    status_schema = openapi_schema(models.ExplorerJobStatus)
    status_schema.pop("required", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{models.PLURAL}.{models.GROUP}"},
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": models.KIND,
                "listKind": f"{models.KIND}List",
                "plural": models.PLURAL,
                "singular": models.KIND.lower(),
                "shortNames": ["ej"],
                "categories": ["all", "rft"],
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.engines.replicas",
                            "statusReplicasPath": ".status.engines.current",
                            "labelSelectorPath": ".status.engines.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": models.ExplorerJobSpec.__doc__,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                            # Rules on metadata.name (only the root sees it) and on names built from it.
                            "x-kubernetes-validations": admission.crd_validations("root"),
                        }
                    },
                }
            ],
        },
    }


HELM_CRD_PATH = "helm/explorer-operator/templates/crd.yaml"
HEADER = "# Generated from explorer_operator.models by `python -m explorer_operator.crdgen`. Do not edit.\n"


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def render_helm_crd() -> str:
    """The chart's copy: the same CRD, installed and upgraded by Helm, kept on uninstall (jobs survive it)."""
    crd = build_crd()
    crd["metadata"]["annotations"] = {"helm.sh/resource-policy": "keep"}
    body = yaml.safe_dump(crd, sort_keys=False, width=120)
    return HEADER + "{{- if .Values.crds.install }}\n" + body + "{{- end }}\n"


def write_all(root: Path) -> None:
    """Regenerate both copies (``python -m explorer_operator.crdgen --write``)."""
    (root / CRD_PATH).write_text(render_crd())
    (root / HELM_CRD_PATH).write_text(render_helm_crd())


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_all(Path.cwd())
    else:
        sys.stdout.write(render_crd())
