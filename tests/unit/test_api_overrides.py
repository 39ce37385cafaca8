"""`resources.podTemplate` and `runPolicy.schedulingPolicy`: what the API models accept and refuse.

Each refusal names the field and the value; the CEL twin of each check (crd.py) says the same,
and tests/integration/test_crd_overrides.py shows the real API server refusing it at admission.
"""

from __future__ import annotations

from typing import Any

import pytest
from ulmfit_operator import crd
from ulmfit_operator.api import parse_spec
from ulmfit_trainer.errors import InvalidSpec

pytestmark = pytest.mark.timeout(60)

STORAGE = {"s3": {"endpoint": "http://minio:9000", "bucket": "ulmfit"}}

FULL: dict[str, Any] = {
    "labels": {"team": "nlp", "example.com/cost-center": "a1"},
    "annotations": {"sidecar.istio.io/inject": "false"},
    "tolerations": [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "pool", "value": "batch", "effect": "NoExecute", "tolerationSeconds": 60},
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 10,
                    "preference": {
                        "matchExpressions": [{"key": "mem", "operator": "Gt", "values": ["64"]}]
                    },
                }
            ],
        },
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 50,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": {"ulmfit.io/job": "topics"}},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        },
    },
    "priorityClassName": "batch-low",
    "schedulerName": "volcano",
    "serviceAccountName": "trainer",
    "imagePullSecrets": ["registry-creds"],
    "volumes": [
        {"name": "data", "persistentVolumeClaim": {"claimName": "corpus", "readOnly": True}},
        {
            "name": "certs",
            "secret": {"secretName": "ca", "items": [{"key": "ca", "path": "ca.pem"}]},
        },
        {"name": "cache", "emptyDir": {"sizeLimit": "10Gi"}},
        {"name": "settings", "configMap": {"name": "settings"}},
    ],
    "volumeMounts": [
        {"name": "data", "mountPath": "/data", "readOnly": True},
        {"name": "certs", "mountPath": "/etc/ssl/extra"},
        {"name": "cache", "mountPath": "/tmp/.cache/huggingface", "subPath": "hf"},
    ],
    "env": [
        {"name": "HTTPS_PROXY", "value": "http://proxy:3128"},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "t"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ],
    "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "APP_"}],
}


def spec_with(pod: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"storage": STORAGE, **extra}
    if pod is not None:
        spec.setdefault("resources", {})["podTemplate"] = pod
    return spec


def problems(spec: dict[str, Any]) -> list[tuple[str, object, str]]:
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(spec)
    return caught.value.problems


def test_full_pod_template_round_trips() -> None:
    parsed = parse_spec(spec_with(FULL))
    pod = parsed.resources.pod_template
    assert pod is not None and pod.scheduler_name == "volcano"
    wire = parsed.to_wire()["resources"]["podTemplate"]
    assert wire["volumeMounts"][2] == {
        "name": "cache",
        "mountPath": "/tmp/.cache/huggingface",
        "subPath": "hf",
    }
    assert parse_spec(parsed.to_wire()) == parsed


def test_pod_template_and_scheduling_policy_default_to_none() -> None:
    parsed = parse_spec(spec_with())
    assert parsed.resources.pod_template is None
    assert parsed.run_policy.scheduling_policy is None


@pytest.mark.parametrize(
    ("pod", "field", "needle"),
    [
        ({"labels": {"ulmfit.io/job": "x"}}, "podTemplate", "key 'ulmfit.io/job' is the operator"),
        (
            {"labels": {"app.kubernetes.io/managed-by": "me"}},
            "podTemplate",
            "'app.kubernetes.io/managed-by' is the operator's own label",
        ),
        ({"labels": {"kueue.x-k8s.io/queue-name": "q"}}, "podTemplate", "operator's own label"),
        ({"labels": {"bad key": "x"}}, "podTemplate", "labels: key 'bad key' is not a valid key"),
        ({"annotations": {"-x": "y"}}, "podTemplate", "annotations: key '-x' is not a valid key"),
        ({"labels": {"team": "not valid!"}}, "podTemplate.labels.team", "pattern"),
        ({"tolerations": [{"key": "a", "effect": "Sometimes"}]}, "tolerations.0.effect", "'No"),
        (
            {"tolerations": [{"key": "a", "operator": "Exists", "value": "v"}]},
            "tolerations.0",
            "value 'v' must be empty",
        ),
        ({"tolerations": [{"value": "v"}]}, "tolerations.0", "operator 'Equal' needs a key"),
        (
            {"tolerations": [{"key": "a", "tolerationSeconds": 5}]},
            "tolerations.0",
            "tolerationSeconds 5 needs effect NoExecute (got None)",
        ),
        (
            {"tolerations": [{"key": "a", "tolerationSeconds": -1, "effect": "NoExecute"}]},
            "tolerationSeconds",
            "greater than or equal to 0",
        ),
        ({"priorityClassName": "High_Priority"}, "priorityClassName", "pattern"),
        ({"schedulerName": ""}, "schedulerName", "at least 1"),
        ({"imagePullSecrets": ["UPPER"]}, "imagePullSecrets.0", "pattern"),
        (
            {"volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]},
            "volumes.0",
            "name 'tmp' is the operator's own volume",
        ),
        (
            {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]},
            "volumes.0.hostPath",
            "unknown field",
        ),
        ({"volumes": [{"name": "v"}]}, "volumes.0", "give exactly one of persistentVolumeClaim"),
        (
            {
                "volumes": [
                    {"name": "v", "emptyDir": {"sizeLimit": "1Gi"}, "secret": {"secretName": "s"}}
                ]
            },
            "volumes.0",
            "(got secret, emptyDir)",
        ),
        ({"volumes": [{"name": "v", "emptyDir": {}}]}, "volumes.0.emptyDir.sizeLimit", "required"),
        (
            {"volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1Gi"}}] * 2},
            "podTemplate",
            "volumes: name 'v' appears more than once",
        ),
        (
            {"volumeMounts": [{"name": "nope", "mountPath": "/data"}]},
            "podTemplate",
            "volumeMounts: 'nope' (at /data) is not a volume",
        ),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "/tmp"}]},
            "volumeMounts.0",
            "mountPath '/tmp' would hide the operator's mount /tmp",
        ),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "/etc"}]},
            "volumeMounts.0",
            "would hide the operator's mount /etc/ulmfit",
        ),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "/dev"}]},
            "volumeMounts.0",
            "would hide the operator's mount /dev/shm",
        ),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "/dev/nvidia0"}]},
            "volumeMounts.0",
            "is inside /dev, where nothing may be mounted",
        ),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "/etc/ulmfit/x"}]},
            "volumeMounts.0",
            "is inside /etc/ulmfit",
        ),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "/data/../etc"}]},
            "volumeMounts.0.mountPath",
            "pattern",
        ),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "relative"}]},
            "volumeMounts.0.mountPath",
            "pattern",
        ),
        (
            {"volumeMounts": [{"name": "v", "mountPath": "/d", "subPath": "../x"}]},
            "volumeMounts.0.subPath",
            "pattern",
        ),
        (
            {"env": [{"name": "HOME", "value": "/root"}]},
            "env.0",
            "name 'HOME' is set by the operator",
        ),
        (
            {"env": [{"name": "ULMFIT_ATTEMPT", "value": "9"}]},
            "env.0",
            "name 'ULMFIT_ATTEMPT' is set by the operator",
        ),
        ({"env": [{"name": "PET_NNODES", "value": "9"}]}, "env.0", "is set by the operator"),
        ({"env": [{"name": "MASTER_ADDR", "value": "x"}]}, "env.0", "is set by the operator"),
        ({"env": [{"name": "1X", "value": "x"}]}, "env.0.name", "pattern"),
        (
            {"env": [{"name": "A", "value": "x"}, {"name": "A", "value": "y"}]},
            "podTemplate",
            "env: name 'A' appears more than once",
        ),
        (
            {
                "env": [
                    {
                        "name": "A",
                        "value": "x",
                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                    }
                ]
            },
            "env.0",
            "variable 'A': give value or valueFrom, not both",
        ),
        (
            {"env": [{"name": "A", "valueFrom": {}}]},
            "env.0.valueFrom",
            "give exactly one of secretKeyRef",
        ),
        (
            {"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "spec.containers"}}}]},
            "fieldPath",
            "Input should be",
        ),
        (
            {"envFrom": [{"prefix": "X_"}]},
            "envFrom.0",
            "give exactly one of secretRef, configMapRef",
        ),
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
                    }
                }
            },
            "nodeSelectorTerms",
            "at least 1",
        ),
        (
            {
                "affinity": {
                    "podAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]
                    }
                }
            },
            "topologyKey",
            "required",
        ),
        (
            {
                "affinity": {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {"weight": 101, "preference": {}}
                        ]
                    }
                }
            },
            "weight",
            "less than or equal to 100",
        ),
    ],
)
def test_bad_pod_template_is_refused_naming_field_and_value(
    pod: dict[str, Any], field: str, needle: str
) -> None:
    found = problems(spec_with(pod))
    assert len(found) == 1, found
    path, _, message = found[0]
    assert path.startswith("spec.resources.podTemplate"), path
    assert field in path, (path, message)
    assert needle in message, message


@pytest.mark.parametrize(
    ("requirement", "needle"),
    [
        ({"key": "a", "operator": "In"}, "operator In needs at least one value"),
        (
            {"key": "a", "operator": "Exists", "values": ["x"]},
            "operator Exists takes no values (got 1)",
        ),
        (
            {"key": "a", "operator": "Gt", "values": ["x"]},
            "operator Gt needs exactly one integer value",
        ),
        (
            {"key": "a", "operator": "Lt", "values": ["1", "2"]},
            "operator Lt needs exactly one integer value",
        ),
        ({"key": "a", "operator": "Near", "values": ["1"]}, "Input should be"),
    ],
)
def test_bad_node_requirement_is_refused(requirement: dict[str, Any], needle: str) -> None:
    pod = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [requirement]}]
                }
            }
        }
    }
    ((path, _, message),) = problems(spec_with(pod))
    assert "matchExpressions.0" in path
    assert needle in message


def test_bad_pod_label_selector_requirement_is_refused() -> None:
    term = {
        "labelSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn"}]},
        "topologyKey": "kubernetes.io/hostname",
    }
    pod = {
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    }
    ((path, _, message),) = problems(spec_with(pod))
    assert path.endswith("labelSelector.matchExpressions.0")
    assert message == "operator NotIn needs at least one value"


def test_env_may_not_name_the_s3_credential_variables() -> None:
    storage = {"s3": {**STORAGE["s3"], "accessKeyEnv": "MY_KEY"}}
    pod = {"env": [{"name": "MY_KEY", "value": "leak"}]}
    ((path, _, message),) = problems({"storage": storage, "resources": {"podTemplate": pod}})
    assert path == "spec"
    assert message == (
        "resources.podTemplate.env: name 'MY_KEY' is the S3 credential variable of storage.s3"
    )
    # Without a store the name is free (and the default names are not the operator's then).
    parse_spec({"resources": {"podTemplate": pod}})


def test_scheduling_policy_bounds() -> None:
    parsed = parse_spec(
        spec_with(
            resources={"workers": 4},
            runPolicy={
                "schedulingPolicy": {
                    "minAvailable": 4,
                    "queue": "research",
                    "priorityClass": "high",
                    "scheduleTimeoutSeconds": 600,
                }
            },
        )
    )
    gang = parsed.run_policy.scheduling_policy
    assert gang is not None and gang.min_available == 4 and gang.queue == "research"
    found = problems(
        spec_with(resources={"workers": 2}, runPolicy={"schedulingPolicy": {"minAvailable": 3}})
    )
    assert found == [
        (
            "spec",
            found[0][1],
            "runPolicy.schedulingPolicy.minAvailable 3 exceeds resources.workers 2",
        )
    ]
    ((path, _, message),) = problems(spec_with(runPolicy={"schedulingPolicy": {"minAvailable": 0}}))
    assert path == "spec.runPolicy.schedulingPolicy.minAvailable" and "greater than" in message
    ((path, _, _),) = problems(spec_with(runPolicy={"schedulingPolicy": {"queue": "Bad Queue"}}))
    assert path == "spec.runPolicy.schedulingPolicy.queue"


def test_cel_messages_say_what_the_validators_say() -> None:
    """The CEL twins' message templates, filled as the API server would, read like the models'."""
    cases = [
        (
            "ULMFiTJobSpec",
            "_gang_fits_the_workers",
            (3, 2),
            spec_with(
                resources={"workers": 2}, runPolicy={"schedulingPolicy": {"minAvailable": 3}}
            ),
        ),
        (
            "Toleration",
            "_consistent",
            ("v",),
            spec_with({"tolerations": [{"key": "a", "operator": "Exists", "value": "v"}]}),
        ),
        ("EnvVar", "_one_value", ("HOME",), spec_with({"env": [{"name": "HOME", "value": "x"}]})),
        (
            "Volume",
            "_one_source",
            ("tmp",),
            spec_with({"volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]}),
        ),
        (
            "VolumeMount",
            "_path_is_free",
            ("/tmp", "/tmp"),
            spec_with({"volumeMounts": [{"name": "v", "mountPath": "/tmp"}]}),
        ),
    ]
    for model, validator, values, spec in cases:
        rule = next(r for r in crd.CEL_RULES[model] if r.validator == f"{model}.{validator}")
        template = rule.message_expression
        literal = template[1 : template.index("'.format(")].replace("\\'", "'")
        ((_, _, message),) = problems(spec)
        assert literal % values == message
