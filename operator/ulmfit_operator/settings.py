"""The operator's settings: `OperatorSettings`, and the one command line made from it.

The model is the single source. `ulmfit operator` (what the image, the chart and the manifests
run) and `python -m ulmfit_operator` are the same command, built by `operator_command` from the
model's fields: one option per field (`metrics_port` -> `--metrics-port`), which falls back to
the environment variable `ULMFIT_<FIELD>` (`ULMFIT_METRICS_PORT`) and then to the field's
default; the model validates what was given. The Helm chart renders every flag from the value
named as the field in camelCase (`metricsPort`), except `namespace` (from `watchNamespaces` with
`rbac.scope: namespace`) and `identity` (per pod: the default, the pod's name); the plain
manifests pass the chart's default flags. tests/unit/test_settings.py and
tests/integration/test_deploy_chart.py keep model, flags, chart and manifests in step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "ULMFIT_"

LogFormat = Literal["json", "text"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class OperatorSettings(BaseModel):
    """How one operator process runs: what it watches, where it listens, how it elects, logs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    namespace: str | None = Field(
        default=None, description="Watch only this namespace. Default: every namespace."
    )
    standalone: bool = Field(
        default=False,
        description="Skip leader election: only where exactly one replica can ever run.",
    )
    metrics_port: int = Field(
        default=8080, ge=1, le=65535, description="Port of the Prometheus /metrics endpoint."
    )
    metrics_address: str = Field(
        default="0.0.0.0", min_length=1, description="Address the /metrics server listens on."
    )
    health_port: int = Field(
        default=8081,
        ge=1,
        le=65535,
        description="Port of /healthz (the liveness, readiness and startup probes).",
    )
    health_address: str = Field(
        default="0.0.0.0", min_length=1, description="Address the /healthz server listens on."
    )
    workers: int = Field(
        default=16,
        ge=1,
        description="Reconciles in flight at once, each of one job (they mostly wait on the API "
        "and S3); the API connection pool holds this many plus 4.",
    )
    resync_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often every unfinished job is looked at again (store progress, stuck "
        "stages, deadlines), without any Kubernetes event.",
    )
    lease_name: str = Field(
        default="ulmfit-operator", min_length=1, description="Name of the leader Lease."
    )
    lease_namespace: str | None = Field(
        default=None,
        description="Namespace of the leader Lease. Default: the watched namespace, else the "
        "pod's own.",
    )
    lease_duration: float = Field(
        default=15.0,
        ge=1,
        description="Seconds a Lease not renewed stays its holder's. The leader renews every "
        "1/7.5 of it and stops (exits) when it could not renew for 2/3 of it.",
    )
    identity: str | None = Field(
        default=None,
        description="This replica's name in the Lease. Default: $POD_NAME, else the host name "
        "and a random suffix.",
    )
    log_format: LogFormat = Field(
        default="json", description="json: one object per line; text: for a terminal."
    )
    log_level: LogLevel = Field(
        default="INFO",
        description="Least severe level logged (kopf's own: WARNING and above unless DEBUG).",
    )

    @field_validator("namespace", "lease_namespace", "identity", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value or None

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def renew_deadline(self) -> float:
        """The leader stops when it could not renew for this long (client-go's ratio)."""
        return self.lease_duration * 2 / 3

    @property
    def retry_period(self) -> float:
        """How often the leader renews and a candidate tries."""
        return max(0.2, self.lease_duration / 7.5)


def flag(field: str) -> str:
    """The command-line flag of a field: `metrics_port` -> `--metrics-port`."""
    return "--" + field.replace("_", "-")


def env_var(field: str) -> str:
    """The environment variable a field's flag falls back to: `ULMFIT_METRICS_PORT`."""
    return ENV_PREFIX + field.upper()


def _parameter(name: str) -> inspect.Parameter:
    field = OperatorSettings.model_fields[name]
    option = typer.Option(
        help=field.description, envvar=env_var(name), show_envvar=True, case_sensitive=False
    )
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=field.default,
        annotation=Annotated[field.annotation, option],
    )


def _problems(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        where = flag(str(problem["loc"][0])) if problem["loc"] else "settings"
        lines.append(f"{where}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def operator_command(run: Callable[[OperatorSettings], None]) -> Callable[..., None]:
    """A typer command with one option per settings field; it validates them and calls `run`."""

    def command(**options: Any) -> None:
        try:
            settings = OperatorSettings(**options)
        except ValidationError as error:
            raise typer.BadParameter(_problems(error)) from None
        run(settings)

    parameters = [_parameter(name) for name in OperatorSettings.model_fields]
    signature = inspect.Signature(parameters, return_annotation=None)
    command.__signature__ = signature  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
    command.__doc__ = (
        "Run the controller (what the operator Deployment runs). Every option falls back to "
        f"its {ENV_PREFIX}* environment variable."
    )
    return command
