"""`python -m ulmfit_operator`: run the controller (flags default from ULMFIT_* variables)."""

from __future__ import annotations

import argparse
import os

from ulmfit_operator.handlers import run_operator


def _env(name: str, default: str) -> str:
    return os.environ.get(f"ULMFIT_{name}", default)


def _flag(name: str) -> bool:
    return _env(name, "").lower() in {"1", "true", "yes"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ulmfit_operator", description="Run the ULMFiTJob controller."
    )
    parser.add_argument(
        "--namespace",
        default=_env("NAMESPACE", "") or None,
        help="watch only this namespace (default: all namespaces)",
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        default=_flag("STANDALONE"),
        help="no leader election (a single replica)",
    )
    parser.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "8000")))
    parser.add_argument("--metrics-address", default=_env("METRICS_ADDRESS", "0.0.0.0"))
    parser.add_argument("--health-port", type=int, default=int(_env("HEALTH_PORT", "8080")))
    parser.add_argument("--health-address", default=_env("HEALTH_ADDRESS", "0.0.0.0"))
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(_env("RESYNC_SECONDS", "30")),
        help="how often unfinished jobs are looked at again (store progress)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=int(_env("WORKERS", "16")),
        help="reconciles in flight at once",
    )
    parser.add_argument("--lease-name", default=_env("LEASE_NAME", "ulmfit-operator"))
    parser.add_argument("--lease-namespace", default=_env("LEASE_NAMESPACE", "") or None)
    parser.add_argument("--lease-duration", type=float, default=float(_env("LEASE_DURATION", "15")))
    parser.add_argument(
        "--identity",
        default=_env("IDENTITY", "") or None,
        help="name in the leader Lease (default: POD_NAME or host name)",
    )
    parser.add_argument(
        "--log-format", choices=["json", "text"], default=_env("LOG_FORMAT", "json")
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_operator(
        args.namespace,
        args.standalone,
        args.metrics_port,
        args.health_port,
        metrics_address=args.metrics_address,
        health_address=args.health_address,
        resync_seconds=args.resync_seconds,
        workers=args.workers,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        lease_duration=args.lease_duration,
        identity=args.identity,
        log_format=args.log_format,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
