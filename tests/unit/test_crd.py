"""The CRD is generated from the API models, stays structural, and is committed up to date."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ulmfit_operator import crd
from ulmfit_operator.api import ULMFiTJobSpec, parse_spec
from ulmfit_trainer.config import BLANK, S3_OBJECT_URI
from ulmfit_trainer.errors import InvalidSpec

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / crd.CRD_FILE

pytestmark = pytest.mark.timeout(60)


def _schemas(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node under `node` with its path."""
    found = [(path, node)]
    for name, prop in (node.get("properties") or {}).items():
        found += _schemas(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _schemas(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _schemas(node["additionalProperties"], f"{path}{{}}")
    return found


def _version() -> dict[str, Any]:
    return crd.render_crd()["spec"]["versions"][0]


def test_operator_crd_committed_yaml_matches_the_models() -> None:
    assert COMMITTED.is_file(), f"{crd.CRD_FILE} is missing; generate it: {crd.REGENERATE}"
    assert COMMITTED.read_text() == crd.render_crd_yaml(), (
        f"{crd.CRD_FILE} drifted from operator/ulmfit_operator/api.py; regenerate it: "
        f"{crd.REGENERATE}"
    )


def test_operator_crd_identity_and_surface() -> None:
    rendered = crd.render_crd()
    assert rendered["metadata"]["name"] == "ulmfitjobs.ulmfit.io"
    names = rendered["spec"]["names"]
    assert names["kind"] == "ULMFiTJob" and names["plural"] == "ulmfitjobs"
    assert set(names["shortNames"]) == {"ulmfit", "uj"}
    version = _version()
    assert version["subresources"] == {"status": {}}
    columns = [column["name"] for column in version["additionalPrinterColumns"]]
    assert columns == ["Stage", "Progress", "ETA", "Accuracy", "Age"]


def test_operator_crd_schema_is_structural_and_documented() -> None:
    schema = _version()["schema"]["openAPIV3Schema"]
    for section in ("spec", "status"):
        for path, node in _schemas(schema["properties"][section], section):
            for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"):
                assert forbidden not in node, f"{path} has {forbidden}"
            assert "type" in node, f"{path} has no type"
            if section == "spec":
                assert "x-kubernetes-preserve-unknown-fields" not in node, path
            if node.get("type") == "object":
                assert "properties" in node or "additionalProperties" in node, path
            # Property schemas (not list items or map values) explain themselves.
            if not path.endswith(("[]", "}")):
                assert node.get("description"), f"{path} has no description"
            if "exclusiveMinimum" in node:
                assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_operator_crd_nullable_enum_and_bounds_come_from_the_models() -> None:
    spec = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    loss = spec["stages"]["properties"]["classifier"]["properties"]["loss"]
    assert loss["type"] == "string" and loss["nullable"] is True
    assert loss["enum"] == ["softmax", "sigmoid"]
    assert "default" not in loss
    epochs = spec["stages"]["properties"]["finetune"]["properties"]["epochs"]
    assert epochs["minimum"] == 0 and epochs["exclusiveMinimum"] is True
    assert spec["resources"]["properties"]["workers"] == {
        "description": spec["resources"]["properties"]["workers"]["description"],
        "type": "integer",
        "default": 1,
        "minimum": 1,
        "maximum": 1024,
    }
    head = spec["stages"]["properties"]["classifier"]["properties"]["head"]
    assert head["enum"] == ["concat", "attention", "hierarchical", "generative"]
    assert head["default"] == "concat"


def test_operator_every_validator_is_a_cel_rule_or_left_to_the_operator() -> None:
    validators = set(crd.iter_validators())
    with_rules = {rule.validator for rules in crd.CEL_RULES.values() for rule in rules}
    assert validators == with_rules | set(crd.CHECKED_BY_OPERATOR), (
        "a model validator was added or renamed: give it a CEL rule in crd.CEL_RULES "
        "(or list it in crd.CHECKED_BY_OPERATOR with the reason)"
    )


def test_operator_cel_rules_sit_on_their_models_and_use_format() -> None:
    spec = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    props = spec["properties"]
    placed = {
        "ULMFiTJobSpec": spec,
        "ArchitectureSpec": props["model"]["properties"]["architecture"],
        "ResourcesSpec": props["resources"],
    }
    for model, node in placed.items():
        rendered = [r for r in node["x-kubernetes-validations"] if r["rule"] != "self == oldSelf"]
        assert rendered == [rule.render() for rule in crd.CEL_RULES[model]]
        for rule in rendered:
            assert ".format([" in rule["messageExpression"]


def test_operator_cel_messages_say_what_the_validators_say() -> None:
    # The API server renders `'... %d ...'.format([...])`; do the same with Python's `%`.
    cases = [
        (
            "ArchitectureSpec",
            {"model": {"architecture": {"hiddenSize": 100, "heads": 3}}},
            (100, 3),
        ),
        ("ULMFiTJobSpec", {"data": {"maxLength": 512}}, (512, 256)),
        ("ResourcesSpec", {"resources": {"gpusPerWorker": 2, "processesPerWorker": 4}}, (4, 2)),
    ]
    for model, spec, values in cases:
        with pytest.raises(InvalidSpec) as caught:
            parse_spec(spec)
        expected = caught.value.problems[0][2]
        template = crd.CEL_RULES[model][0].message_expression
        literal = template[1 : template.index("'.format(")]
        assert literal % values == expected


def _cel_literal(rule: crd.CelRule) -> str:
    """The message expression's format string as the API server sees it (quotes unescaped)."""
    template = rule.message_expression
    return template[1 : template.index("'.format(")].replace("\\'", "'")


MASKED_GENERATIVE_COTRAIN = {
    "model": {"family": "masked"},
    "stages": {
        "cotrain": {
            "models": [{"name": "a"}],
            "minAgreement": 1,
            "classifier": {"head": "generative"},
        }
    },
}


@pytest.mark.parametrize(
    ("model", "validator", "index", "spec", "values"),
    [
        ("DataSpec", "DataSpec._dataset_shape", 0, {"data": {"dataset": ""}}, ("",)),
        ("DataSpec", "DataSpec._dataset_shape", 1, {"data": {"dataset": "s3://"}}, ("s3://",)),
        (
            "DataSpec", "DataSpec._dataset_shape", 1, {"data": {"dataset": "s3:///k"}},
            ("s3:///k",),
        ),
        (
            "ModelSpec", "ModelSpec._pretrained_shape", 0, {"model": {"pretrained": "s3:///m"}},
            ("s3:///m",),
        ),
        (
            "TokenizerSpec", "TokenizerSpec._pretrained_shape", 0,
            {"tokenizer": {"pretrained": "s3://"}}, ("s3://",),
        ),
        (
            "ULMFiTJobSpec", "ULMFiTJobSpec._heads_fit_the_family", 1,
            {"model": {"family": "masked"}, "stages": {"classifier": {"head": "generative"}}},
            ("generative", "masked"),
        ),
        (
            "ULMFiTJobSpec", "ULMFiTJobSpec._heads_fit_the_family", 2, MASKED_GENERATIVE_COTRAIN,
            ("generative", "masked"),
        ),
        (
            "ULMFiTJobSpec", "ULMFiTJobSpec._precision_fits_the_device", 3,
            {"deepspeed": {"precision": "fp16"}}, ("fp16", 0),
        ),
    ],
    ids=[
        "empty-dataset", "s3-empty", "s3-no-bucket", "s3-model", "s3-tokenizer",
        "generative-masked", "generative-masked-cotrain", "fp16-on-cpu",
    ],
)  # fmt: skip
def test_operator_cel_rules_for_specs_that_cannot_run_say_what_the_validators_say(
    model: str, validator: str, index: int, spec: dict[str, Any], values: tuple[object, ...]
) -> None:
    rule = crd.CEL_RULES[model][index]
    assert rule.validator == validator
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec)
    assert _cel_literal(rule) % values == caught.value.problems[0][2]


def test_operator_cel_field_rules_point_at_their_field_and_share_the_models_regexes() -> None:
    props = _version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    placed = {
        "DataSpec": (props["data"], ".dataset"),
        "ModelSpec": (props["model"], ".pretrained"),
        "TokenizerSpec": (props["tokenizer"], ".pretrained"),
    }
    for model, (node, field_path) in placed.items():
        rendered = [r for r in node["x-kubernetes-validations"] if r["rule"] != "self == oldSelf"]
        assert rendered == [rule.render() for rule in crd.CEL_RULES[model]]
        assert {rule["fieldPath"] for rule in rendered} == {field_path}
    s3_rules = [rule.rule for name in placed for rule in crd.CEL_RULES[name][-1:]]
    assert all(f"matches(r'{S3_OBJECT_URI}')" in rule for rule in s3_rules)
    assert f"matches(r'{BLANK}')" in crd.CEL_RULES["DataSpec"][0].rule


@pytest.mark.parametrize(
    ("pattern", "text", "found"),
    [
        (S3_OBJECT_URI, "s3://bucket/key", True),
        (S3_OBJECT_URI, "s3://my.bucket-1//a/b/", True),
        (S3_OBJECT_URI, "s3://", False),
        (S3_OBJECT_URI, "s3:///key", False),
        (S3_OBJECT_URI, "s3://bucket", False),
        (S3_OBJECT_URI, "s3://bucket/", False),
        (S3_OBJECT_URI, "s3://ab/key", False),  # bucket names have at least 3 characters
        (S3_OBJECT_URI, "s3://Bucket/key", False),
        (S3_OBJECT_URI, "s3://bucket:9000/key", False),
        (BLANK, "", True),
        (BLANK, " \t\n", True),
        (BLANK, " data ", False),
    ],
)
def test_operator_cel_regexes_mean_what_the_validators_check(
    pattern: str, text: str, found: bool
) -> None:
    # CEL's `matches` is RE2 search, like `re.search`; the patterns use no syntax where the two
    # differ (no lookaround, backreferences or \Z).
    assert bool(re.search(pattern, text)) is found


def _apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """The API server's structural defaulting: missing fields get their default, then recurse."""
    if not isinstance(value, dict) or schema.get("type") != "object":
        return value
    result = dict(value)
    for name, prop in (schema.get("properties") or {}).items():
        if name not in result and "default" in prop:
            result[name] = copy.deepcopy(prop["default"])
        if name in result and result[name] is None and not prop.get("nullable"):
            del result[name]  # null without nullable is pruned
        if name in result:
            result[name] = _apply_defaults(result[name], prop)
    return result


@pytest.mark.parametrize(
    "given",
    [
        {},
        {"stages": {"pretrain": {}}},
        {"stages": {"pretrain": {"epochs": 2}}, "model": {"family": "masked"}},
        {"resources": {"workers": 3, "nodeSelector": {"pool": "gpu"}}},
        {"storage": {"s3": {"endpoint": "http://minio:9000", "bucket": "ulmfit"}}},
        {"model": {"pretrained": None}, "data": {"maxTrainExamples": 10}},
    ],
)
def test_operator_crd_defaults_are_the_models_defaults(given: dict[str, Any]) -> None:
    spec_schema = crd.spec_schema()
    defaulted = _drop_nulls(_apply_defaults(given, spec_schema))
    assert defaulted == parse_spec(given).to_wire()


def _drop_nulls(value: Any) -> Any:
    """A kept null (nullable field) means the same as an absent field to the models."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return value


def test_operator_crd_default_spec_is_the_default_model() -> None:
    assert crd.spec_schema()["default"] == ULMFiTJobSpec().to_wire()


def test_operator_spec_is_immutable_except_run_policy_and_resources() -> None:
    props = crd.spec_schema()["properties"]
    for name, prop in props.items():
        rules = [r["rule"] for r in prop.get("x-kubernetes-validations", [])]
        assert ("self == oldSelf" in rules) is (name not in crd.MUTABLE_SPEC_FIELDS), name


def test_operator_crd_module_writes_the_yaml(tmp_path: Path) -> None:
    target = tmp_path / "crd.yaml"
    assert crd.main([str(target)]) == 0
    documents = list(yaml.safe_load_all(target.read_text()))
    assert documents == [crd.render_crd()]
