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

A list setting (`allowed_s3_endpoints`, `allowed_trainer_images`, `job_s3_cidrs`) is one flag
whose value is the list's entries joined by commas
(`--allowed-s3-endpoints=http://minio:9000,s3.example.com`), as is its environment variable;
like every flag, the last one given wins (tests append their own to the chart's), and an empty
value is an empty list. The chart joins its list value into that flag (`allowedS3Endpoints`,
empty by default, falls back to `s3.endpoint`, then to `*`).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ulmfit_operator.api import DEFAULT_TRAINER_IMAGE, TrainingBackend
from ulmfit_operator.children.common import DEFAULT_TRAINING_RUNTIME
from ulmfit_operator.policy import (
    ANY,
    JobPolicy,
    PodNetwork,
    check_cidr,
    check_endpoint_entry,
    check_image_pattern,
    parse_label_selector,
)

ENV_PREFIX = "ULMFIT_"
LIST_SEPARATOR = ","

DEFAULT_TRAINER_REPOSITORY = DEFAULT_TRAINER_IMAGE.rsplit(":", 1)[0]
"""The project's trainer image repository (the default image without its tag)."""

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
        "1/7.5 of it and stops reconciling when it could not renew for 2/3 of it (until it "
        "holds the Lease again).",
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
    allowed_s3_endpoints: tuple[str, ...] = Field(
        default=(ANY,),
        description="S3 endpoints a job's spec.storage.s3.endpoint may name, comma-separated: "
        "the operator reads them with its own keys, so a job naming another fails InvalidSpec "
        "and none is contacted. Each host[:port] or http(s)://host[:port], compared as scheme, "
        "host and port (a missing port is the scheme's; an entry without a scheme allows both). "
        "'*': any endpoint (the default here; the chart passes its s3.endpoint). Empty: none.",
    )
    allowed_trainer_images: tuple[str, ...] = Field(
        default=(DEFAULT_TRAINER_REPOSITORY,),
        description="Trainer images a job's spec.resources.image may name, comma-separated "
        "patterns: REPOSITORY (any tag and/or digest of it), PREFIX* (every image starting with "
        "PREFIX; '*' alone: any), or an exact image with a tag or digest. A job with another "
        "image fails InvalidSpec before any child is created.",
    )
    job_network_policy: Literal["isolate", "none"] = Field(
        default="isolate",
        description="isolate: each job gets a NetworkPolicy; its pods take traffic only from "
        "each other (and the Ray dashboard port from --ray-operator-pods) and send it only to "
        "each other, to DNS (port 53) and to the job's S3 endpoint port at --job-s3-cidrs. "
        "none: no policy (a cluster without a NetworkPolicy enforcer ignores it either way).",
    )
    job_s3_cidrs: tuple[str, ...] = Field(
        default=("0.0.0.0/0", "::/0"),
        description="Networks where a job's pods may reach the port of its S3 endpoint, "
        "comma-separated CIDRs: narrow them to the store's addresses.",
    )
    ray_operator_pods: str = Field(
        default="app.kubernetes.io/name=kuberay-operator",
        description="Labels (key=value, comma-separated) of the KubeRay operator's pods, in any "
        "namespace: they may reach a RayJob head's dashboard port (8265) to follow the sweep. "
        "Empty: no pod outside the job may.",
    )
    training_backend: TrainingBackend = Field(
        default=TrainingBackend.AUTO,
        description="What the distributed stages of a job without spec.resources."
        "trainingBackend run as: trainjob (Kubeflow Trainer v2), pytorchjob (Kubeflow Training "
        "Operator v1) or auto: TrainJob where the API server serves trainjobs.trainer."
        "kubeflow.org, else PyTorchJob (discovery at start-up and when leadership is taken).",
    )
    training_runtime: str = Field(
        default=DEFAULT_TRAINING_RUNTIME,
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="The ClusterTrainingRuntime every TrainJob names (the chart installs it).",
    )

    @field_validator("namespace", "lease_namespace", "identity", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return value or None

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator(
        "allowed_s3_endpoints", "allowed_trainer_images", "job_s3_cidrs", mode="before"
    )
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(LIST_SEPARATOR) if part.strip())
        return value

    @field_validator("allowed_s3_endpoints")
    @classmethod
    def _endpoints_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_endpoint_entry(entry) for entry in value)

    @field_validator("allowed_trainer_images")
    @classmethod
    def _image_patterns_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_image_pattern(pattern) for pattern in value)

    @field_validator("job_s3_cidrs")
    @classmethod
    def _cidrs_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_cidr(entry) for entry in value)

    @field_validator("ray_operator_pods")
    @classmethod
    def _labels_parse(cls, value: str) -> str:
        parse_label_selector(value)
        return value.strip()

    def job_policy(self) -> JobPolicy:
        """What these settings let a job make the operator reach (what reconcile enforces)."""
        network = None
        if self.job_network_policy == "isolate":
            network = PodNetwork(
                s3_cidrs=self.job_s3_cidrs,
                ray_operator_labels=parse_label_selector(self.ray_operator_pods),
            )
        return JobPolicy.allowing(
            self.allowed_s3_endpoints, self.allowed_trainer_images, pod_network=network
        )

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


def is_list(field: str) -> bool:
    """A list setting: one flag, its entries joined by commas."""
    return typing.get_origin(OperatorSettings.model_fields[field].annotation) is tuple


def flag_default(field: str) -> Any:
    """The default of a field's flag: the field's, a list's joined by commas."""
    default = OperatorSettings.model_fields[field].default
    return LIST_SEPARATOR.join(default) if is_list(field) else default


def _parameter(name: str) -> inspect.Parameter:
    field = OperatorSettings.model_fields[name]
    option = typer.Option(
        help=field.description, envvar=env_var(name), show_envvar=True, case_sensitive=False
    )
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=flag_default(name),
        annotation=Annotated[str if is_list(name) else field.annotation, option],
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
