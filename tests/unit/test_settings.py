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
from ulmfit_operator.settings import OperatorSettings, env_var, flag

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ulmfit-operator"
MANIFEST = ROOT / "manifests" / "operator" / "deployment.yaml"

FIELDS = list(OperatorSettings.model_fields)

NOT_CHART_VALUES = {
    "namespace": "watchNamespaces",  # the one namespace of `rbac.scope: namespace`
    "identity": "POD_NAME",  # per pod: the default identity is the pod's name
}
"""Settings the chart does not take as a value of their own, and what sets them instead."""

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
    ],
)
def test_invalid_settings_stop_with_the_flag_named(
    entry: str, args: list[str], named: str, started: list[OperatorSettings]
) -> None:
    result = run(entry, args)
    assert result.exit_code == 2
    assert named in result.output
    assert started == []


# --- the chart and the manifests ----------------------------------------------------------------


def test_every_setting_has_a_chart_value_with_the_same_default() -> None:
    values = chart_values()
    for name, field in OperatorSettings.model_fields.items():
        if name in NOT_CHART_VALUES:
            continue
        key = chart_value(name)
        assert key in values, f"values.yaml has no {key} for {flag(name)}"
        default = field.default if field.default is not None else ""
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
        if name in NOT_CHART_VALUES or name == "standalone":
            continue
        value = chart_value(name)
        direct = f"- {flag(name)}={{{{ .Values.{value} }}}}"
        optional = f"{{{{- with .Values.{value} }}}}\n            - {flag(name)}={{{{ . }}}}"
        assert direct in template or optional in template, f"{value} -> {flag(name)}"
    assert "{{- if .Values.standalone }}\n            - --standalone" in template
    assert "- --namespace={{ $watch }}" in template
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
