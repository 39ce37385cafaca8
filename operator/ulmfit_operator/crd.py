"""Render the `ulmfitjobs.ulmfit.io` CustomResourceDefinition from the API models.

`api.py` (spec) and `status.py` (status) are the one source: their pydantic JSON schemas become a
structural OpenAPI v3 schema here: `$ref`s inlined, `anyOf [X, null]` turned into `X` with
`nullable`, every field described and defaulted as the models say. The cross-field checks of the
models' validators become CEL rules (`x-kubernetes-validations`) with the same messages, so the API
server rejects at admission what `api.parse_spec` would reject.

    python -m ulmfit_operator.crd > manifests/crd/ulmfit.io_ulmfitjobs.yaml
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel
from ulmfit_trainer.config import (
    BLANK,
    PRETRAINED_SHAPE,
    PRETRAINED_URI,
    S3_OBJECT_URI,
    S3_URI_SHAPE,
    TUNABLE,
)

from ulmfit_operator.api import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    ULMFiTJobSpec,
)
from ulmfit_operator.pod_overrides import (
    INTEGER,
    LABEL_KEY,
    OPERATOR_ENV,
    OPERATOR_ENV_PREFIXES,
    OPERATOR_LABEL_PREFIX,
    OPERATOR_LABELS,
    OPERATOR_MOUNT_PATHS,
    OPERATOR_VOLUMES,
    SEALED_MOUNT_PATHS,
)
from ulmfit_operator.status import ULMFiTJobStatus

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"manifests/crd/{GROUP}_{PLURAL}.yaml"
REGENERATE = f"ulmfit crd > {CRD_FILE}  (or: python -m ulmfit_operator.crd > {CRD_FILE})"


@dataclass(frozen=True)
class CelRule:
    """One `x-kubernetes-validations` entry standing in for a pydantic validator."""

    validator: str
    """`Model.method` of the validator this rule mirrors."""
    rule: str
    message_expression: str
    """Builds the same message as the validator, with the offending values. (`format`, not
    `+ string(x)`: the API server's cost estimate for concatenating converted numbers assumes
    unbounded strings and rejects the rule.)"""
    message: str
    """Static fallback when the message expression cannot be evaluated."""
    field_path: str | None = None

    def render(self) -> dict[str, Any]:
        rendered: dict[str, Any] = {
            "rule": self.rule,
            "message": self.message,
            "messageExpression": self.message_expression,
        }
        if self.field_path:
            rendered["fieldPath"] = self.field_path
        return rendered


def _cel_regex(pattern: str) -> str:
    """A regex as a CEL raw string literal (backslashes reach RE2 as they are)."""
    if "'" in pattern:
        raise ValueError(f"a quote in a CEL regex: {pattern!r}")
    return f"r'{pattern}'"


def _s3_uri_rule(validator: str, field: str, *, optional: bool) -> CelRule:
    """The CEL twin of `config.s3_uri_problem` for the string field `field` of a model."""
    value = f"self.{field}"
    present = f"!has({value}) || " if optional else ""
    return CelRule(
        validator=validator,
        rule=(
            f"{present}!{value}.startsWith('s3://') || {value}.matches({_cel_regex(S3_OBJECT_URI)})"
        ),
        message_expression=f"'{field} \\'%s\\' {S3_URI_SHAPE}'.format([{value}])",
        message=f"{field} {S3_URI_SHAPE}",
        field_path=f".{field}",
    )


def _pretrained_rule(validator: str) -> CelRule:
    """The CEL twin of `config.pretrained_problem` for an optional `pretrained` field: one rule
    (one message) for every malformed form, as the validator raises one."""
    value = "self.pretrained"
    return CelRule(
        validator=validator,
        rule=(
            f"!has({value}) || ({value}.startsWith('s3://')"
            f" ? {value}.matches({_cel_regex(S3_OBJECT_URI)})"
            f" : (!{value}.contains('://') || {value}.matches({_cel_regex(PRETRAINED_URI)})))"
        ),
        message_expression=f"'pretrained \\'%s\\' {PRETRAINED_SHAPE}'.format([{value}])",
        message=f"pretrained {PRETRAINED_SHAPE}",
        field_path=".pretrained",
    )


def _cel_list(values: typing.Iterable[str]) -> str:
    return "[" + ", ".join(f"'{value}'" for value in values) + "]"


def _unique_rule(validator: str, field: str, key: str) -> CelRule:
    """Every item of the list `field` has its own `key`."""
    items = f"self.{field}"
    duplicate = f"{items}.filter(a, {items}.filter(b, b.{key} == a.{key}).size() > 1)[0].{key}"
    return CelRule(
        validator=validator,
        rule=f"{items}.all(a, {items}.filter(b, b.{key} == a.{key}).size() == 1)",
        message_expression=(
            f"'{field}: {key} \\'%s\\' appears more than once'.format([{duplicate}])"
        ),
        message=f"{field}: each {key} once",
        field_path=f".{field}",
    )


def _label_keys_rule(validator: str, field: str) -> CelRule:
    bad = f"!(size(k) <= 317 && k.matches({_cel_regex(LABEL_KEY)}))"
    return CelRule(
        validator=validator,
        rule=f"self.{field}.all(k, size(k) <= 317 && k.matches({_cel_regex(LABEL_KEY)}))",
        message_expression=(
            f"'{field}: key \\'%s\\' is not a valid key: an optional DNS-subdomain prefix and"
            " \\'/\\', then at most 63 alphanumerics, \\'-\\', \\'_\\' or \\'.\\''"
            f".format([self.{field}.filter(k, {bad})[0]])"
        ),
        message=f"{field}: a key is not a valid label key",
        field_path=f".{field}",
    )


def _requirement_rules(validator: str) -> list[CelRule]:
    return [
        CelRule(
            validator=validator,
            rule="!(self.operator in ['In', 'NotIn']) || size(self.values) > 0",
            message_expression="'operator %s needs at least one value'.format([self.operator])",
            message="operators In and NotIn need at least one value",
        ),
        CelRule(
            validator=validator,
            rule="!(self.operator in ['Exists', 'DoesNotExist']) || size(self.values) == 0",
            message_expression=(
                "'operator %s takes no values (got %d)'.format([self.operator, size(self.values)])"
            ),
            message="operators Exists and DoesNotExist take no values",
        ),
    ]


_OPERATOR_ENV_RULE = " && ".join(
    [f"!(self.name in {_cel_list(OPERATOR_ENV)})"]
    + [f"!self.name.startsWith('{prefix}')" for prefix in OPERATOR_ENV_PREFIXES]
)
_CREDENTIALS = (
    "[self.storage.s3.accessKeyEnv, self.storage.s3.secretKeyEnv, self.storage.s3.sessionTokenEnv]"
)
_OPERATOR_LABEL = f"(k.startsWith('{OPERATOR_LABEL_PREFIX}') || k in {_cel_list(OPERATOR_LABELS)})"


# Keyed by model class name: the rules attach to that model's object schema wherever it appears.
# Every field has a default, so after defaulting the fields these rules read are always present.
CEL_RULES: dict[str, list[CelRule]] = {
    "ULMFiTJobSpec": [
        CelRule(
            validator="ULMFiTJobSpec._sequences_fit_the_model",
            rule=(
                "has(self.model.pretrained)"
                " || self.data.maxLength <= self.model.architecture.contextLength"
            ),
            message_expression=(
                "'data.maxLength %d exceeds model.architecture.contextLength %d'"
                ".format([self.data.maxLength, self.model.architecture.contextLength])"
            ),
            message="data.maxLength exceeds model.architecture.contextLength",
        ),
        CelRule(
            validator="ULMFiTJobSpec._heads_fit_the_family",
            rule="self.model.family == 'causal' || self.stages.classifier.head != 'generative'",
            message_expression=(
                "'stages.classifier.head \\'%s\\' needs a causal LM, but model.family is"
                " \\'%s\\': use the concat, attention or hierarchical head'"
                ".format([self.stages.classifier.head, self.model.family])"
            ),
            message="the generative head needs a causal LM (model.family: causal)",
        ),
        CelRule(
            validator="ULMFiTJobSpec._heads_fit_the_family",
            rule=(
                "self.model.family == 'causal' || !has(self.stages.cotrain)"
                " || !has(self.stages.cotrain.classifier)"
                " || self.stages.cotrain.classifier.head != 'generative'"
            ),
            message_expression=(
                "'stages.cotrain.classifier.head \\'%s\\' needs a causal LM, but model.family"
                " is \\'%s\\': use the concat, attention or hierarchical head'"
                ".format([self.stages.cotrain.classifier.head, self.model.family])"
            ),
            message="the generative head needs a causal LM (model.family: causal)",
        ),
        CelRule(
            validator="ULMFiTJobSpec._precision_fits_the_device",
            rule="self.deepspeed.precision != 'fp16' || self.resources.gpusPerWorker > 0",
            message_expression=(
                "'deepspeed.precision \\'%s\\' needs GPUs, but resources.gpusPerWorker is %d:"
                " on CPU use bf16 or fp32'"
                ".format([self.deepspeed.precision, self.resources.gpusPerWorker])"
            ),
            message="deepspeed.precision fp16 needs GPUs (resources.gpusPerWorker above 0)",
        ),
        CelRule(
            validator="ULMFiTJobSpec._gang_fits_the_workers",
            rule=(
                "!has(self.runPolicy.schedulingPolicy)"
                " || !has(self.runPolicy.schedulingPolicy.minAvailable)"
                " || self.runPolicy.schedulingPolicy.minAvailable <= self.resources.workers"
            ),
            message_expression=(
                "'runPolicy.schedulingPolicy.minAvailable %d exceeds resources.workers %d'"
                ".format([self.runPolicy.schedulingPolicy.minAvailable, self.resources.workers])"
            ),
            message="runPolicy.schedulingPolicy.minAvailable exceeds resources.workers",
        ),
        CelRule(
            validator="ULMFiTJobSpec._env_leaves_the_credentials",
            rule=(
                "!has(self.resources.podTemplate) || !has(self.storage.s3)"
                f" || self.resources.podTemplate.env.all(e, !(e.name in {_CREDENTIALS}))"
            ),
            message_expression=(
                "'resources.podTemplate.env: name \\'%s\\' is the S3 credential variable of"
                " storage.s3'.format([self.resources.podTemplate.env"
                f".filter(e, e.name in {_CREDENTIALS})[0].name])"
            ),
            message="resources.podTemplate.env names an S3 credential variable of storage.s3",
        ),
    ],
    "DataSpec": [
        CelRule(
            validator="DataSpec._dataset_shape",
            rule=f"!self.dataset.matches({_cel_regex(BLANK)})",
            message_expression=(
                "'dataset \\'%s\\' is empty: give builtin://NAME, s3://bucket/key or a"
                " directory'.format([self.dataset])"
            ),
            message="dataset is empty: give builtin://NAME, s3://bucket/key or a directory",
            field_path=".dataset",
        ),
        _s3_uri_rule("DataSpec._dataset_shape", "dataset", optional=False),
    ],
    "ModelSpec": [_pretrained_rule("ModelSpec._pretrained_shape")],
    "TokenizerSpec": [_pretrained_rule("TokenizerSpec._pretrained_shape")],
    "ArchitectureSpec": [
        CelRule(
            validator="ArchitectureSpec._heads_divide_width",
            rule="self.hiddenSize % self.heads == 0",
            message_expression=(
                "'hiddenSize %d must be a multiple of heads %d'"
                ".format([self.hiddenSize, self.heads])"
            ),
            message="hiddenSize must be a multiple of heads",
        ),
    ],
    "ResourcesSpec": [
        CelRule(
            validator="ResourcesSpec._processes_fit_gpus",
            rule="self.gpusPerWorker == 0 || self.processesPerWorker <= self.gpusPerWorker",
            message_expression=(
                "'processesPerWorker %d exceeds gpusPerWorker %d: one training process per GPU"
                " at most'.format([self.processesPerWorker, self.gpusPerWorker])"
            ),
            message="processesPerWorker exceeds gpusPerWorker",
        ),
    ],
    "ClassifierStageSpec": [
        CelRule(
            validator="ClassifierStageSpec._windows_advance",
            rule="self.windowOverlap < self.maxDocumentTokens",
            message_expression=(
                "'windowOverlap %d must be less than maxDocumentTokens %d'"
                ".format([self.windowOverlap, self.maxDocumentTokens])"
            ),
            message="windowOverlap must be less than maxDocumentTokens",
        ),
    ],
    "LabelingRule": [
        CelRule(
            validator="LabelingRule._matches_something",
            rule="size(self.keywords) > 0 || size(self.patterns) > 0",
            message_expression=(
                "'rule for label \\'%s\\' needs keywords or patterns'.format([self.label])"
            ),
            message="a labeling rule needs keywords or patterns",
        ),
    ],
    "CotrainSpec": [
        CelRule(
            validator="CotrainSpec._agreement_possible",
            rule="self.minAgreement <= size(self.models)",
            message_expression=(
                "'minAgreement %d exceeds the %d models'"
                ".format([self.minAgreement, size(self.models)])"
            ),
            message="minAgreement exceeds the number of models",
        ),
        CelRule(
            validator="CotrainSpec._agreement_possible",
            rule="self.models.all(m, self.models.filter(n, n.name == m.name).size() == 1)",
            message_expression="'model names must be unique'",
            message="model names must be unique",
        ),
    ],
    "SearchDomain": [
        CelRule(
            validator="SearchDomain._bounds",
            rule="self.type != 'choice' || size(self.values) > 0",
            message_expression="'a choice needs at least one value in `values`'",
            message="a choice needs at least one value in `values`",
        ),
        CelRule(
            validator="SearchDomain._bounds",
            rule="self.type == 'choice' || (has(self.low) && has(self.high))",
            message_expression="'a %s domain needs `low` and `high`'.format([self.type])",
            message="this domain needs `low` and `high`",
        ),
        CelRule(
            validator="SearchDomain._bounds",
            rule=(
                "self.type == 'choice' || !has(self.low) || !has(self.high) || self.low < self.high"
            ),
            message_expression="'low %s must be less than high %s'.format([self.low, self.high])",
            message="low must be less than high",
        ),
        CelRule(
            validator="SearchDomain._bounds",
            rule="self.type != 'loguniform' || !has(self.low) || self.low > 0.0",
            message_expression="'a loguniform domain needs low > 0, got %s'.format([self.low])",
            message="a loguniform domain needs low > 0",
        ),
    ],
    "TuneSpec": [
        CelRule(
            validator="TuneSpec._tunable_fields",
            rule=f"self.space.all(k, k in [{', '.join(repr(name) for name in TUNABLE)}])",
            message_expression=f"'cannot tune a field outside {', '.join(TUNABLE)}'",
            message="cannot tune this field",
        ),
    ],
    "Toleration": [
        CelRule(
            validator="Toleration._consistent",
            rule="!has(self.value) || self.value == '' || self.operator != 'Exists'",
            message_expression=(
                "'value \\'%s\\' must be empty when operator is Exists'.format([self.value])"
            ),
            message="value must be empty when operator is Exists",
        ),
        CelRule(
            validator="Toleration._consistent",
            rule="(has(self.key) && self.key != '') || self.operator == 'Exists'",
            message_expression=(
                "'operator \\'%s\\' needs a key: an empty key needs Exists'.format([self.operator])"
            ),
            message="an empty key needs operator Exists",
        ),
        CelRule(
            validator="Toleration._consistent",
            rule="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message_expression=(
                "'tolerationSeconds %d needs effect NoExecute (got %s)'"
                ".format([self.tolerationSeconds, has(self.effect) ? self.effect : 'None'])"
            ),
            message="tolerationSeconds needs effect NoExecute",
        ),
    ],
    "NodeSelectorRequirement": [
        *_requirement_rules("NodeSelectorRequirement._values_fit_operator"),
        CelRule(
            validator="NodeSelectorRequirement._values_fit_operator",
            rule=(
                "!(self.operator in ['Gt', 'Lt'])"
                f" || (size(self.values) == 1 && self.values[0].matches({_cel_regex(INTEGER)}))"
            ),
            message_expression=(
                "'operator %s needs exactly one integer value'.format([self.operator])"
            ),
            message="operators Gt and Lt need exactly one integer value",
        ),
    ],
    "LabelSelectorRequirement": _requirement_rules("LabelSelectorRequirement._values_fit_operator"),
    "EnvVarSource": [
        CelRule(
            validator="EnvVarSource._exactly_one",
            rule=(
                "[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef)]"
                ".filter(x, x).size() == 1"
            ),
            message_expression="'give exactly one of secretKeyRef, configMapKeyRef, fieldRef'",
            message="give exactly one of secretKeyRef, configMapKeyRef, fieldRef",
        ),
    ],
    "EnvVar": [
        CelRule(
            validator="EnvVar._one_value",
            rule=_OPERATOR_ENV_RULE,
            message_expression="'name \\'%s\\' is set by the operator'.format([self.name])",
            message="this variable is set by the operator",
            field_path=".name",
        ),
        CelRule(
            validator="EnvVar._one_value",
            rule="!has(self.value) || !has(self.valueFrom)",
            message_expression=(
                "'variable \\'%s\\': give value or valueFrom, not both'.format([self.name])"
            ),
            message="give value or valueFrom, not both",
        ),
    ],
    "EnvFromSource": [
        CelRule(
            validator="EnvFromSource._exactly_one",
            rule="has(self.secretRef) != has(self.configMapRef)",
            message_expression="'give exactly one of secretRef, configMapRef'",
            message="give exactly one of secretRef, configMapRef",
        ),
    ],
    "Volume": [
        CelRule(
            validator="Volume._one_source",
            rule=f"!(self.name in {_cel_list(OPERATOR_VOLUMES)})",
            message_expression=(
                "'name \\'%s\\' is the operator\\'s own volume'.format([self.name])"
            ),
            message="this name is the operator's own volume",
            field_path=".name",
        ),
        CelRule(
            validator="Volume._one_source",
            rule=(
                "[has(self.persistentVolumeClaim), has(self.configMap), has(self.secret),"
                " has(self.emptyDir)].filter(x, x).size() == 1"
            ),
            message_expression=(
                "'volume \\'%s\\': give exactly one of persistentVolumeClaim, configMap, secret,"
                " emptyDir'.format([self.name])"
            ),
            message="give exactly one of persistentVolumeClaim, configMap, secret, emptyDir",
        ),
    ],
    "VolumeMount": [
        CelRule(
            validator="VolumeMount._path_is_free",
            rule=(
                f"!{_cel_list(OPERATOR_MOUNT_PATHS)}"
                ".exists(p, p == self.mountPath || p.startsWith(self.mountPath + '/'))"
            ),
            message_expression=(
                "'mountPath \\'%s\\' would hide the operator\\'s mount %s'.format([self.mountPath,"
                f" {_cel_list(OPERATOR_MOUNT_PATHS)}"
                ".filter(p, p == self.mountPath || p.startsWith(self.mountPath + '/'))[0]])"
            ),
            message="mountPath would hide one of the operator's mounts",
            field_path=".mountPath",
        ),
        CelRule(
            validator="VolumeMount._path_is_free",
            rule=f"!{_cel_list(SEALED_MOUNT_PATHS)}.exists(p, self.mountPath.startsWith(p + '/'))",
            message_expression=(
                "'mountPath \\'%s\\' is inside %s, where nothing may be mounted'"
                f".format([self.mountPath, {_cel_list(SEALED_MOUNT_PATHS)}"
                ".filter(p, self.mountPath.startsWith(p + '/'))[0]])"
            ),
            message="mountPath is inside a tree where nothing may be mounted",
            field_path=".mountPath",
        ),
    ],
    "PodTemplateOverrides": [
        CelRule(
            validator="PodTemplateOverrides._consistent",
            rule=f"self.labels.all(k, !{_OPERATOR_LABEL})",
            message_expression=(
                "'labels: key \\'%s\\' is the operator\\'s own label'"
                f".format([self.labels.filter(k, {_OPERATOR_LABEL})[0]])"
            ),
            message="labels: a key is the operator's own label",
            field_path=".labels",
        ),
        _label_keys_rule("PodTemplateOverrides._consistent", "labels"),
        _label_keys_rule("PodTemplateOverrides._consistent", "annotations"),
        _unique_rule("PodTemplateOverrides._consistent", "volumes", "name"),
        _unique_rule("PodTemplateOverrides._consistent", "volumeMounts", "mountPath"),
        _unique_rule("PodTemplateOverrides._consistent", "env", "name"),
        CelRule(
            validator="PodTemplateOverrides._consistent",
            rule="self.volumeMounts.all(m, self.volumes.exists(v, v.name == m.name))",
            message_expression=(
                "'volumeMounts: \\'%s\\' (at %s) is not a volume of podTemplate.volumes'.format(["
                "self.volumeMounts.filter(m, !self.volumes.exists(v, v.name == m.name))[0].name,"
                " self.volumeMounts.filter(m, !self.volumes.exists(v, v.name == m.name))[0]"
                ".mountPath])"
            ),
            message="volumeMounts: a mount names no volume of podTemplate.volumes",
            field_path=".volumeMounts",
        ),
    ],
}

# Validators deliberately left to the operator (which reports them as `InvalidSpec`), with why.
CHECKED_BY_OPERATOR: dict[str, str] = {
    "S3Settings._endpoint_shape": "URL parsing and normalization; CEL has no URL parser",
    "S3Settings._prefix_shape": "strips slashes before checking the key segments",
}

# Spec fields that may change after creation. The rest is fixed once the job exists: every stage
# must see the same plan, whichever attempt or operator replica runs it. Resources apply from the
# next attempt on; run-policy changes (suspend, deadlines, retries, TTL) apply at once.
MUTABLE_SPEC_FIELDS = frozenset({"runPolicy", "resources"})

_KEY_ORDER = [
    "description",
    "type",
    "format",
    "enum",
    "default",
    "nullable",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "items",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "required",
    "properties",
    "additionalProperties",
    "x-kubernetes-validations",
]
_CARRIED = {
    "type",
    "format",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
}


class CRDRenderError(ValueError):
    """The models use a schema construct a structural CRD schema cannot express."""


_MISSING = object()


def _describe(text: str | None) -> str | None:
    """Docstring prose as one paragraph per blank-line-separated block."""
    if not text:
        return None
    blocks = [" ".join(block.split()) for block in text.strip().split("\n\n")]
    return "\n\n".join(block for block in blocks if block)


def _models_under(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model class reachable from `root`'s fields, by class name (pydantic's `$defs` key)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation.__name__ not in found:
                found[annotation.__name__] = annotation
                for field in annotation.model_fields.values():
                    visit(field.annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(root)
    return found


def _json_default(value: Any) -> Any:
    """A field default as it appears on the wire, complete (the API server checks a default
    against the CEL rules as it stands, without filling in the nested defaults first)."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, list):
        return [_json_default(item) for item in value]
    if isinstance(value, dict):
        return {key: _json_default(item) for key, item in value.items()}
    if hasattr(value, "value"):  # an Enum member
        return value.value
    return value


class _Renderer:
    def __init__(self, root: type[BaseModel], *, defaults: bool):
        self.schema = root.model_json_schema(by_alias=True, mode="validation")
        self.defs: dict[str, Any] = self.schema.get("$defs", {})
        self.models = _models_under(root)
        self.defaults = defaults

    def render(self) -> dict[str, Any]:
        return self._node(self.schema, model=self._root_model())

    def _root_model(self) -> str:
        return str(self.schema.get("title"))

    def _model_for_ref(self, ref: str) -> tuple[str, dict[str, Any]]:
        prefix = "#/$defs/"
        if not ref.startswith(prefix) or ref[len(prefix) :] not in self.defs:
            raise CRDRenderError(f"unsupported $ref {ref!r}")
        name = ref[len(prefix) :]
        return name, self.defs[name]

    def _node(
        self,
        node: dict[str, Any],
        *,
        model: str | None = None,
        default: Any = _MISSING,
        described: bool = True,
    ) -> dict[str, Any]:
        node = dict(node)
        description = node.pop("description", None)
        if default is _MISSING:
            default = node.pop("default", _MISSING)
        else:
            node.pop("default", None)
        node.pop("title", None)
        nullable = False

        if "allOf" in node and len(node["allOf"]) == 1:
            node.update(node.pop("allOf")[0])
        options = node.get("anyOf") or []
        refs = [option for option in options if set(option) == {"$ref"}]
        if len(options) == 2 and len(refs) == 1 and {"type": "null"} in options:
            # An optional model (`X | None`): render it as the model itself, so that its CEL rules
            # come along (rendering the option on its own and merging it would drop them).
            node.pop("anyOf")
            node["$ref"] = refs[0]["$ref"]
            nullable = True
        if "$ref" in node:
            model, target = self._model_for_ref(node.pop("$ref"))
            if description is None:
                description = target.get("description")
            node = {
                **{k: v for k, v in target.items() if k not in ("description", "title")},
                **node,
            }
        if "anyOf" in node:
            options = node.pop("anyOf")
            kept = [option for option in options if option.get("type") != "null"]
            nullable = len(kept) < len(options)
            if len(kept) != 1:
                raise CRDRenderError(f"unions other than X|None are not structural: {options}")
            inner = self._node(kept[0], described=False)
            if description is None:
                description = inner.pop("description", None)
            inner.pop("description", None)
            inner.pop("default", None)
            node = {**inner, **node}

        out: dict[str, Any] = {}
        if "const" in node:
            out["enum"] = [node.pop("const")]
        for key in _CARRIED:
            if key in node:
                out[key] = node[key]
        if "enum" in out and "type" not in out:
            out["type"] = "string"
        for bound in ("exclusiveMinimum", "exclusiveMaximum"):
            value = node.get(bound)
            if isinstance(value, bool):
                out[bound] = value
            elif value is not None:  # JSON Schema 2020-12 number -> OpenAPI v3.0 flag
                out["minimum" if bound == "exclusiveMinimum" else "maximum"] = value
                out[bound] = True

        if out.get("type") == "object" or "properties" in node:
            out["type"] = "object"
            self._object(node, out, model)
        if out.get("type") == "array":
            if "items" not in node:
                raise CRDRenderError("an array needs an items schema")
            out["items"] = self._node(node["items"], described=False)

        if description := _describe(description):
            out["description"] = description
        elif described:
            raise CRDRenderError(f"a field has no description (document it in the model): {node}")
        if self.defaults and default is not _MISSING and default is not None:
            out["default"] = _json_default(default)
        if nullable:
            out["nullable"] = True
        return self._ordered(out)

    def _object(self, node: dict[str, Any], out: dict[str, Any], model: str | None) -> None:
        properties = node.get("properties")
        extra = node.get("additionalProperties")
        if properties:
            cls = self.models.get(model or "")
            rendered = {}
            for name, prop in properties.items():
                default: Any = _MISSING
                field = self._field(cls, name)
                if field is not None and field.default_factory is not None:
                    default = field.default_factory()  # type: ignore[call-arg]
                rendered[name] = self._node(prop, default=default)
            out["properties"] = rendered
            if node.get("required"):
                out["required"] = list(node["required"])
            if isinstance(extra, dict):
                raise CRDRenderError("an object cannot have both properties and a value schema")
        elif isinstance(extra, dict):
            out["additionalProperties"] = self._node(extra, described=False)
        elif extra is not False:
            raise CRDRenderError("free-form objects are not allowed in the schema")
        rules = CEL_RULES.get(model or "", [])
        if rules:
            out["x-kubernetes-validations"] = [rule.render() for rule in rules]

    @staticmethod
    def _field(cls: type[BaseModel] | None, wire_name: str) -> Any:
        if cls is None:
            return None
        for python_name, field in cls.model_fields.items():
            if (field.alias or python_name) == wire_name:
                return field
        return None

    @staticmethod
    def _ordered(node: dict[str, Any]) -> dict[str, Any]:
        rank = {key: index for index, key in enumerate(_KEY_ORDER)}
        return dict(sorted(node.items(), key=lambda item: rank.get(item[0], len(rank))))


def spec_schema() -> dict[str, Any]:
    """The structural schema of `.spec`, with defaults, CEL rules and immutability rules."""
    schema = _Renderer(ULMFiTJobSpec, defaults=True).render()
    schema["default"] = _json_default(ULMFiTJobSpec())
    for name, prop in schema["properties"].items():
        if name not in MUTABLE_SPEC_FIELDS:
            prop.setdefault("x-kubernetes-validations", []).append(
                {"rule": "self == oldSelf", "message": f"spec.{name} is immutable"}
            )
    return _Renderer._ordered(schema)


def status_schema() -> dict[str, Any]:
    """The structural schema of `.status` (no defaults: only the operator writes it)."""
    return _Renderer(ULMFiTJobStatus, defaults=False).render()


PRINTER_COLUMNS = [
    {
        "name": "Stage",
        "type": "string",
        "jsonPath": ".status.currentStage",
        "description": "The stage that runs now (or ran last).",
    },
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Progress of the current stage, or how the job ended.",
    },
    {
        "name": "ETA",
        "type": "string",
        "jsonPath": ".status.eta",
        "description": "Time left in the running stages at their current pace.",
    },
    {
        "name": "Accuracy",
        "type": "number",
        "jsonPath": ".status.result.testMetrics.accuracy",
        "description": "Test accuracy of the finished classifier.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def render_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict, ready to apply."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "ulmfit-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["ulmfit"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "description": (
                                "A ULMFiT text classifier trained in stages (LM pretraining and "
                                "fine-tuning, classifier fine-tuning with gradual unfreezing, "
                                "evaluation), each stage a PyTorchJob that checkpoints to S3."
                            ),
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {
                                    "description": "API version: `ulmfit.io/v1alpha1`.",
                                    "type": "string",
                                },
                                "kind": {"description": "`ULMFiTJob`.", "type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block style, keys in insertion order, multi-line strings as literal blocks."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def render_crd_yaml() -> str:
    header = (
        f"# Generated from operator/ulmfit_operator/api.py; do not edit. Regenerate: {REGENERATE}\n"
    )
    body = yaml.dump(
        render_crd(), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100
    )
    return header + "---\n" + body


def iter_validators(root: type[BaseModel] = ULMFiTJobSpec) -> Iterator[str]:
    """`Model.method` of every model and field validator reachable from the spec."""
    for name, cls in _models_under(root).items():
        decorators = cls.__pydantic_decorators__
        for method in (*decorators.model_validators, *decorators.field_validators):
            yield f"{name}.{method}"


def main(argv: list[str] | None = None) -> int:
    """Print the CRD YAML, or write it to the file named by the only argument."""
    args = sys.argv[1:] if argv is None else argv
    text = render_crd_yaml()
    if args:
        with open(args[0], "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
