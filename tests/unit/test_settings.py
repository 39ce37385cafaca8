"""One set of operator settings: the model, both commands, the chart's values, the manifests.

`OperatorSettings` is the source. Both entry points (`ulmfit operator`, which the image runs, and
`python -m ulmfit_operator`) must offer exactly one option per field, with the field's default
and its ULMFIT_* fallback; the chart must have a documented value per field that its Deployment
turns into that flag, with the same default; the plain manifests must pass the same defaults.
What needs the real helm (rendering) is in tests/integration/test_deploy_chart.py.
"""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner
from ulmfit_operator import __main__ as module_main
from ulmfit_operator import cli
from ulmfit_operator.policy import S3Endpoint
from ulmfit_operator.settings import (
    DEFAULT_TRAINER_REPOSITORY,
    OperatorSettings,
    env_var,
    flag,
    flag_default,
    is_list,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ulmfit-operator"
MANIFEST = ROOT / "manifests" / "operator" / "deployment.yaml"

FIELDS = list(OperatorSettings.model_fields)

NOT_CHART_VALUES = {
    "namespace": "watchNamespaces",  # the one namespace of `rbac.scope: namespace`
    "identity": "POD_NAME",  # per pod: the default identity is the pod's name
}
"""Settings the chart does not take as a value of their own, and what sets them instead."""

DERIVED_CHART_DEFAULTS = {"allowed_s3_endpoints": "s3.endpoint"}
"""List settings whose chart value is empty by default and then comes from another value (and
`*` when that is empty too: tests/integration/test_deploy_chart.py renders both)."""

LIST_FIELDS = [name for name in FIELDS if is_list(name)]

# A value other than the default for every field, as a flag's argument.
OTHER = {
    "namespace": "ml-team",
    "standalone": None,  # a switch
    "metrics_port": "9100",
    "metrics_address": "127.0.0.1",
    "health_port": "9101",
    "health_address": "127.0.0.2",
    "workers": "3",
    "resync_seconds": "2.5",
    "lease_name": "my-lease",
    "lease_namespace": "leases",
    "lease_duration": "6",
    "identity": "replica-a",
    "log_format": "text",
    "log_level": "debug",
    "allowed_s3_endpoints": "https://s3.example.com,minio.minio.svc:9000",
    "allowed_trainer_images": "registry.example.com/ml/trainer,registry.example.com/ml/tools/*",
    "job_network_policy": "none",
    "job_s3_cidrs": "10.1.0.0/16,fd00::/8",
    "ray_operator_pods": "app=ray-ops",
}


def chart_value(field: str) -> str:
    """The chart value of a setting: the field in camelCase (`metrics_port` -> `metricsPort`)."""
    head, *rest = field.split("_")
    return head + "".join(word.capitalize() for word in rest)


def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def expected_other() -> OperatorSettings:
    values: dict[str, Any] = {k: v for k, v in OTHER.items() if v is not None}
    return OperatorSettings(standalone=True, **values)


def other_args() -> list[str]:
    return [flag(k) if v is None else f"{flag(k)}={v}" for k, v in OTHER.items()]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[OperatorSettings]:
    """What the commands would run the operator with (kopf and the cluster stay out of it)."""
    runs: list[OperatorSettings] = []
    handlers = types.ModuleType("ulmfit_operator.handlers")
    handlers.run_operator = runs.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ulmfit_operator.handlers", handlers)
    for field in FIELDS:
        monkeypatch.delenv(env_var(field), raising=False)
    return runs


ENTRY_POINTS = {
    "ulmfit operator": (cli.app, ["operator"]),
    "python -m ulmfit_operator": (module_main.app, []),
}


def run(entry: str, args: list[str], env: dict[str, str] | None = None) -> Any:
    app, prefix = ENTRY_POINTS[entry]
    return CliRunner().invoke(app, [*prefix, *args], env=env)


def command_params(entry: str) -> dict[str, Any]:
    app, prefix = ENTRY_POINTS[entry]
    command: Any = typer.main.get_command(app)
    if prefix:
        command = command.commands[prefix[0]]
    return {p.name: p for p in command.params if p.name != "help"}


# --- the model ----------------------------------------------------------------------------------


def test_defaults_are_the_charts_ports_and_the_lease_timings_follow_the_duration() -> None:
    settings = OperatorSettings()
    assert (settings.metrics_port, settings.health_port) == (8080, 8081)
    assert (settings.renew_deadline, settings.retry_period) == (10.0, 2.0)
    assert OperatorSettings(lease_duration=1).retry_period == 0.2
    assert OperatorSettings(namespace="", lease_namespace="", identity="").namespace is None
    assert OperatorSettings(log_level="warning").log_level == "WARNING"


def test_every_field_is_described() -> None:
    for name, field in OperatorSettings.model_fields.items():
        assert field.description, name


# --- both commands ------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_each_command_has_one_option_per_setting(entry: str) -> None:
    params = command_params(entry)
    assert list(params) == FIELDS
    for name, field in OperatorSettings.model_fields.items():
        param = params[name]
        assert param.opts == [flag(name)], name
        assert param.envvar == env_var(name), name
        assert param.default == flag_default(name), name
        if is_list(name):
            assert param.default == ",".join(field.default), name
        else:
            assert param.default == field.default, name
        assert param.help == field.description, name


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_no_flags_run_the_defaults(entry: str, started: list[OperatorSettings]) -> None:
    result = run(entry, [])
    assert result.exit_code == 0, result.output
    assert started == [OperatorSettings()]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_flag_reaches_its_setting(entry: str, started: list[OperatorSettings]) -> None:
    result = run(entry, other_args())
    assert result.exit_code == 0, result.output
    assert started == [expected_other()]
    # The last of a repeated flag counts (tests append their own to the chart's).
    result = run(entry, ["--resync-seconds=30", "--resync-seconds=1"])
    assert result.exit_code == 0, result.output
    assert started[-1].resync_seconds == 1.0


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_setting_falls_back_to_its_environment_variable(
    entry: str, started: list[OperatorSettings]
) -> None:
    env = {env_var(k): "true" if v is None else v for k, v in OTHER.items()}
    result = run(entry, [], env=env)
    assert result.exit_code == 0, result.output
    assert started == [expected_other()]
    # A flag wins over the variable.
    result = run(entry, ["--workers=5"], env={env_var("workers"): "7"})
    assert result.exit_code == 0, result.output
    assert started[-1].workers == 5


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--workers=0"], "--workers"),
        (["--lease-duration=0.5"], "--lease-duration"),
        (["--metrics-port=70000"], "--metrics-port"),
        (["--log-format=xml"], "--log-format"),
        (["--resync-seconds=soon"], "--resync-seconds"),
        (["--allowed-s3-endpoints=ftp://minio:21"], "--allowed-s3-endpoints"),
        (["--allowed-s3-endpoints=http://minio:9000/bucket"], "--allowed-s3-endpoints"),
        (["--allowed-s3-endpoints=minio:port"], "--allowed-s3-endpoints"),
        (["--allowed-trainer-images=registry/*/trainer"], "--allowed-trainer-images"),
    ],
)
def test_invalid_settings_stop_with_the_flag_named(
    entry: str, args: list[str], named: str, started: list[OperatorSettings]
) -> None:
    result = run(entry, args)
    assert result.exit_code == 2
    assert named in result.output
    assert started == []


# --- list settings -------------------------------------------------------------------------------


def test_the_default_bounds_any_endpoint_and_the_projects_trainer_repository() -> None:
    settings = OperatorSettings()
    assert settings.allowed_s3_endpoints == ("*",)
    assert settings.allowed_trainer_images == (DEFAULT_TRAINER_REPOSITORY,)
    assert DEFAULT_TRAINER_REPOSITORY == "ghcr.io/ulmfit-operator/trainer"
    policy = settings.job_policy()
    assert policy.s3_endpoints is None  # any
    assert policy.trainer_images == ("ghcr.io/ulmfit-operator/trainer",)
    assert policy.image_allowed("ghcr.io/ulmfit-operator/trainer:0.1.0")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_list_setting_is_one_comma_separated_flag_and_the_last_one_wins(
    entry: str, started: list[OperatorSettings]
) -> None:
    result = run(
        entry,
        [
            "--allowed-s3-endpoints=http://a:9000",
            "--allowed-s3-endpoints= http://Minio:9000 ,s3.example.com,",
            "--allowed-trainer-images=registry.example.com/ml/trainer,*",
        ],
    )
    assert result.exit_code == 0, result.output
    [settings] = started
    assert settings.allowed_s3_endpoints == ("http://Minio:9000", "s3.example.com")
    assert settings.allowed_trainer_images == ("registry.example.com/ml/trainer", "*")
    policy = settings.job_policy()
    assert policy.s3_endpoints == (
        S3Endpoint("http", "minio", 9000),
        S3Endpoint(None, "s3.example.com", None),
    )
    assert policy.trainer_images is None  # `*`: any image
    # An empty value is an empty list: nothing allowed (not the default).
    result = run(entry, ["--allowed-s3-endpoints="], env={env_var("allowed_s3_endpoints"): "x"})
    assert result.exit_code == 0, result.output
    assert started[-1].allowed_s3_endpoints == ()
    assert started[-1].job_policy().s3_endpoints == ()
    # The environment variable takes the same list.
    result = run(entry, [], env={env_var("allowed_trainer_images"): "a/b, c/d:1"})
    assert result.exit_code == 0, result.output
    assert started[-1].allowed_trainer_images == ("a/b", "c/d:1")


# --- the chart and the manifests ----------------------------------------------------------------


def test_every_setting_has_a_chart_value_with_the_same_default() -> None:
    values = chart_values()
    for name, field in OperatorSettings.model_fields.items():
        if name in NOT_CHART_VALUES:
            continue
        key = chart_value(name)
        assert key in values, f"values.yaml has no {key} for {flag(name)}"
        if name in DERIVED_CHART_DEFAULTS:
            assert values[key] == [], f"{key}: empty by default, then from the other value"
            continue
        default = field.default if field.default is not None else ""
        if is_list(name):
            default = list(default)
        assert values[key] == default, f"{key}: {values[key]!r} in the chart, {default!r} here"
    assert values["watchNamespaces"] == [] and OperatorSettings().namespace is None


def test_every_chart_value_of_a_setting_is_in_the_schema() -> None:
    properties = json.loads((CHART / "values.schema.json").read_text())["properties"]
    for name in FIELDS:
        if name not in NOT_CHART_VALUES:
            assert chart_value(name) in properties, chart_value(name)


def test_the_deployment_template_renders_each_value_to_its_flag() -> None:
    template = (CHART / "templates" / "deployment.yaml").read_text()
    for name in FIELDS:
        if name in NOT_CHART_VALUES or name == "standalone" or is_list(name):
            continue
        value = chart_value(name)
        direct = f"- {flag(name)}={{{{ .Values.{value} }}}}"
        optional = f"{{{{- with .Values.{value} }}}}\n            - {flag(name)}={{{{ . }}}}"
        assert direct in template or optional in template, f"{value} -> {flag(name)}"
    assert "{{- if .Values.standalone }}\n            - --standalone" in template
    assert "- --namespace={{ $watch }}" in template
    # A list value: its entries joined by commas into the one flag (s3 endpoints: a helper that
    # falls back to s3.endpoint, then `*`).
    assert LIST_FIELDS == ["allowed_s3_endpoints", "allowed_trainer_images", "job_s3_cidrs"]
    assert (
        '- {{ printf "--allowed-trainer-images=%s" (join "," .Values.allowedTrainerImages) '
        "| quote }}" in template
    )
    assert '- {{ printf "--job-s3-cidrs=%s" (join "," .Values.jobS3Cidrs) | quote }}' in template
    assert (
        '- {{ printf "--allowed-s3-endpoints=%s" (include "ulmfit-operator.allowedS3Endpoints" '
        ".) | quote }}" in template
    )
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert '{{- join "," .Values.allowedS3Endpoints -}}' in helpers
    assert '{{- .Values.s3.endpoint | default "*" -}}' in helpers
    # The default identity is the pod's name.
    assert re.search(
        r"- name: POD_NAME\n\s+valueFrom:\n\s+fieldRef:\n\s+fieldPath: metadata.name", template
    )


def test_the_manifests_pass_the_default_settings(started: list[OperatorSettings]) -> None:
    (deployment,) = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    passed = {arg.split("=", 1)[0] for arg in args}
    rendered_by_default = {
        flag(name)
        for name, field in OperatorSettings.model_fields.items()
        if field.default is not None and field.annotation is not bool
    }
    assert passed == rendered_by_default
    result = run("ulmfit operator", args)
    assert result.exit_code == 0, result.output
    assert started == [OperatorSettings()]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["metrics"], ports["health"]) == (8080, 8081)
