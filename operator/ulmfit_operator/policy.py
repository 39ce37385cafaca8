"""Pure: what the operator lets a job make it reach: S3 endpoints and trainer images.

A job names the S3 endpoint the operator then contacts with its own keys, and the trainer image
that the operator's ServiceAccount then runs; whoever may create a ULMFiTJob chooses both. The
operator's settings (`--allowed-s3-endpoints`, `--allowed-trainer-images`) bound them, and
`reconcile` refuses a job outside the bounds (`InvalidSpec`, before any child is created and
before the store is read). `JobPolicy` carries those bounds into the pure reconcile, with
`PodNetwork`: what the NetworkPolicy that fences each job's pods lets through
(`--job-network-policy`, `--job-s3-cidrs`, `--ray-operator-pods`).

S3 endpoints: `*` (any), or `host[:port]` / `http(s)://host[:port]` as in
`spec.storage.s3.endpoint`. They are compared as scheme, host and port: the host without case,
a missing port is the scheme's (80, 443), the job's scheme is the one it connects with (its
`secure` wins over the URL's), and an entry without a scheme allows both.

Trainer image patterns, as the chart's ValidatingAdmissionPolicy matches them too:

- `REPOSITORY` (no tag, no digest): that repository with any tag and/or digest
  (`ghcr.io/ulmfit-operator/trainer` allows `ghcr.io/ulmfit-operator/trainer:0.1.0` and
  `...trainer@sha256:...`, not `ghcr.io/ulmfit-operator/trainer-other`);
- `PREFIX*` (one `*`, at the end): every image that starts with PREFIX (`registry.example.com/ml/*`;
  `*` alone: any image);
- anything else (with a `:tag` or an `@digest`): that image exactly.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from ulmfit_trainer.config import S3Settings

ANY = "*"
"""The allow-list entry that allows everything."""

DEFAULT_PORTS = {"http": 80, "https": 443}

IMAGE_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
"""A tag, as the OCI distribution reference grammar defines it."""
IMAGE_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
"""A digest (`sha256:<hex>`), as the OCI distribution reference grammar defines it."""

_PATTERN_FORBIDDEN = re.compile(r"[\s,\"'\\]")

PatternKind = Literal["repository", "prefix", "exact"]


# ------------------------------------------------------------------------------ S3 endpoints


@dataclass(frozen=True)
class S3Endpoint:
    """An S3 endpoint as compared: scheme (None: either), host, port (None: the scheme's)."""

    scheme: Literal["http", "https"] | None
    host: str
    port: int | None

    @classmethod
    def parse(cls, text: str) -> S3Endpoint:
        """An allow-list entry or a job's endpoint: `host[:port]` or `http(s)://host[:port]`."""
        value = text.strip()
        scheme: Literal["http", "https"] | None = None
        if "://" in value:
            parts = urlsplit(value)
            lowered = parts.scheme.lower()
            if lowered not in DEFAULT_PORTS:
                raise ValueError(f"S3 endpoint scheme must be http or https, not {parts.scheme!r}")
            scheme = "https" if lowered == "https" else "http"
        else:
            parts = urlsplit(f"//{value}")
        if (
            not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
            or parts.password is not None
        ):
            raise ValueError(
                f"S3 endpoint {text!r} is not host[:port] or http(s)://host[:port] (no path, "
                "no user)"
            )
        return cls(scheme, parts.hostname.lower(), parts.port)

    @classmethod
    def of(cls, s3: S3Settings) -> S3Endpoint:
        """Where a job's store settings make a client connect: scheme, host and port all set."""
        parsed = cls.parse(s3.endpoint)
        scheme: Literal["http", "https"] = "https" if s3.use_tls else "http"
        return cls(scheme, parsed.host, parsed.port or DEFAULT_PORTS[scheme])

    def allows(self, target: S3Endpoint) -> bool:
        """Whether this allow-list entry allows `target` (a resolved endpoint, see `of`)."""
        if self.host != target.host:
            return False
        if self.scheme is not None and self.scheme != target.scheme:
            return False
        scheme = self.scheme or target.scheme or "http"
        return (self.port or DEFAULT_PORTS[scheme]) == target.port

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        where = f"{host}:{self.port}" if self.port is not None else host
        return f"{self.scheme}://{where}" if self.scheme else where


def check_endpoint_entry(entry: str) -> str:
    """An allow-list entry, as given, once it is known to parse (`*` or an endpoint)."""
    entry = entry.strip()
    if entry != ANY:
        S3Endpoint.parse(entry)
    return entry


# ---------------------------------------------------------------------------- trainer images


def check_image_pattern(pattern: str) -> str:
    """A trainer image pattern, as given, once it is known to be one (see the module doc)."""
    pattern = pattern.strip()
    if not pattern:
        raise ValueError("an image pattern is empty")
    if _PATTERN_FORBIDDEN.search(pattern):
        raise ValueError(f"image pattern {pattern!r} holds a space, comma, quote or backslash")
    if "*" in pattern[:-1]:
        raise ValueError(f"image pattern {pattern!r} has a '*' that is not its last character")
    return pattern


def image_pattern_kind(pattern: str) -> PatternKind:
    if pattern.endswith("*"):
        return "prefix"
    if "@" in pattern or ":" in pattern.rsplit("/", 1)[-1]:
        return "exact"
    return "repository"


def image_pattern_regex(pattern: str) -> str:
    """The regular expression (for a whole-string match) of a pattern. RE2 and Python agree on
    it; the chart's ValidatingAdmissionPolicy builds the same one in CEL."""
    kind = image_pattern_kind(pattern)
    if kind == "prefix":
        return re.escape(pattern[:-1]) + ".*"
    if kind == "exact":
        return re.escape(pattern)
    return re.escape(pattern) + f"(?::{IMAGE_TAG})?(?:@{IMAGE_DIGEST})?"


def describe_image_pattern(pattern: str) -> str:
    kind = image_pattern_kind(pattern)
    if kind == "repository":
        return f"{pattern}[:TAG][@DIGEST]"
    return pattern


def image_matches(image: str, pattern: str) -> bool:
    return re.fullmatch(image_pattern_regex(pattern), image) is not None


# -------------------------------------------------------------------------------- pod network

_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_LABEL_PREFIX = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


def check_cidr(text: str) -> str:
    """An IPv4 or IPv6 network (`10.0.0.0/8`, `::/0`), as given, once it is known to be one."""
    text = text.strip()
    try:
        ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        raise ValueError(f"{text!r} is not a CIDR network ({error})") from None
    return text


def parse_label_selector(text: str) -> tuple[tuple[str, str], ...]:
    """`key=value[,key=value...]` (a label selector of equalities); empty: no pods."""
    pairs: list[tuple[str, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        prefix, slash, name = key.rpartition("/")
        if (
            not sep
            or not _LABEL_NAME.fullmatch(name)
            or (slash and (len(prefix) > 253 or not _LABEL_PREFIX.fullmatch(prefix)))
            or (value and not _LABEL_NAME.fullmatch(value))
        ):
            raise ValueError(f"{part!r} is not key=value with a label key and value")
        pairs.append((key, value))
    return tuple(pairs)


@dataclass(frozen=True)
class PodNetwork:
    """What the NetworkPolicy of each job lets its pods do, besides talking to each other.

    Egress: DNS (port 53) anywhere, and the job's S3 endpoint port at `s3_cidrs`. Ingress: the
    Ray dashboard port from the pods (in any namespace) labelled `ray_operator_labels`, which a
    KubeRay RayJob needs (the KubeRay operator asks the head's dashboard how the sweep goes; the
    backend `pod` binds its dashboard to the pod's loopback)."""

    s3_cidrs: tuple[str, ...] = ("0.0.0.0/0", "::/0")
    ray_operator_labels: tuple[tuple[str, str], ...] = ()


# ----------------------------------------------------------------------------------- the policy


@dataclass(frozen=True)
class JobPolicy:
    """What a job may make the operator reach. `None`: anything (no bound); empty: nothing."""

    s3_endpoints: tuple[S3Endpoint, ...] | None = None
    trainer_images: tuple[str, ...] | None = None
    pod_network: PodNetwork | None = None
    """The NetworkPolicy each job gets; None: none (the pods are not fenced)."""

    @classmethod
    def allowing(
        cls,
        s3_endpoints: Iterable[str],
        trainer_images: Iterable[str],
        pod_network: PodNetwork | None = None,
    ) -> JobPolicy:
        """From the settings' lists (`*` in a list: anything)."""
        endpoints = tuple(entry.strip() for entry in s3_endpoints)
        images = tuple(check_image_pattern(p) for p in trainer_images)
        return cls(
            s3_endpoints=None if ANY in endpoints else tuple(map(S3Endpoint.parse, endpoints)),
            trainer_images=None if ANY in images else images,
            pod_network=pod_network,
        )

    def s3_allowed(self, s3: S3Settings) -> bool:
        if self.s3_endpoints is None:
            return True
        try:
            target = S3Endpoint.of(s3)
        except ValueError:
            return False
        return any(entry.allows(target) for entry in self.s3_endpoints)

    def image_allowed(self, image: str) -> bool:
        if self.trainer_images is None:
            return True
        return any(image_matches(image, pattern) for pattern in self.trainer_images)

    def problems(self, s3: S3Settings, image: str) -> list[tuple[str, object, str]]:
        """The `InvalidSpec` problems of a job with this store and this trainer image."""
        problems: list[tuple[str, object, str]] = []
        if not self.s3_allowed(s3):
            problems.append(("spec.storage.s3.endpoint", s3.endpoint, self._s3_refusal(s3)))
        if not self.image_allowed(image):
            allowed = ", ".join(map(describe_image_pattern, self.trainer_images or ()))
            problems.append(
                (
                    "spec.resources.image",
                    image,
                    (
                        f"the operator runs only trainer images matching {allowed}"
                        if allowed
                        else "the operator allows no trainer image"
                    )
                    + " (its --allowed-trainer-images; chart value allowedTrainerImages)",
                )
            )
        return problems

    def _s3_refusal(self, s3: S3Settings) -> str:
        try:
            resolved = f"{S3Endpoint.of(s3)} is not one of them"
        except ValueError:
            resolved = "it has a user part or does not parse"
        allowed = ", ".join(map(str, self.s3_endpoints or ()))
        head = (
            f"the operator allows only the S3 endpoints {allowed}; {resolved}"
            if allowed
            else "the operator allows no S3 endpoint"
        )
        return head + " (its --allowed-s3-endpoints; chart value allowedS3Endpoints)"


UNBOUNDED = JobPolicy()
"""Bounds nothing: what a pure `reconcile` assumes unless told (the operator passes its own)."""


__all__ = [
    "ANY",
    "UNBOUNDED",
    "JobPolicy",
    "PodNetwork",
    "S3Endpoint",
    "check_cidr",
    "check_endpoint_entry",
    "check_image_pattern",
    "describe_image_pattern",
    "image_matches",
    "image_pattern_kind",
    "image_pattern_regex",
    "parse_label_selector",
]
