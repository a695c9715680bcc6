"""The CRD in crds/ is generated from the pydantic models; drift between them fails here."""

from __future__ import annotations

from explorer_operator import crdgen, models
from kubeplane import paths


def test_crd_file_matches_the_models() -> None:
    on_disk = (paths.repo_root() / crdgen.CRD_PATH).read_text()
    assert on_disk == crdgen.render_crd(), "crds/ drifted: run `python -m explorer_operator.crdgen --write`"
    chart_copy = (paths.repo_root() / crdgen.HELM_CRD_PATH).read_text()
    assert chart_copy == crdgen.render_helm_crd(), "the chart's CRD drifted: run the same command"


def test_schema_is_structural_with_descriptions_and_nullable_optionals() -> None:
    spec = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    text = repr(spec)
    assert "$ref" not in text and "anyOf" not in text and "'title'" not in text
    model = spec["properties"]["model"]
    assert model["required"] == ["path"]
    assert model["properties"]["maxModelLen"]["nullable"] is True
    assert model["properties"]["dtype"]["enum"] == ["auto", "bfloat16", "float16", "float32"]
    assert "kubectl" not in model["properties"]["path"]["description"]  # a real description, from the model
    assert spec["properties"]["engines"]["properties"]["resources"]["x-kubernetes-preserve-unknown-fields"] is True
    timeout = spec["properties"]["sync"]["properties"]["timeoutSeconds"]
    assert timeout["minimum"] == 0 and timeout["exclusiveMinimum"] is True


def test_nested_defaults_are_complete_objects_so_cel_rules_can_evaluate_them() -> None:
    spec = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert (
        spec["properties"]["sync"]["default"] == models.ExplorerJobSpec.model_fields["sync"].default_factory().to_wire()
    )  # type: ignore[misc]
    rules = [r["rule"] for r in spec["properties"]["sync"]["x-kubernetes-validations"]]
    assert "self.method != 'checkpoint' || has(self.checkpointPath)" in rules
