"""Property tests: no input crashes the spec parser or the checkpoint record reader with anything
but their own clear error (InvalidSpec naming a field; CheckpointCorrupt / ValueError)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ulmfit_operator.api import ULMFiTJob, load_job_file, parse_spec
from ulmfit_trainer.errors import InvalidSpec
from ulmfit_trainer.records import CheckpointRecord, parse_checkpoint_record, parse_progress
from ulmfit_trainer.store import CheckpointCorrupt, CheckpointStore, LocalStore, NoCheckpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def example_jobs() -> list[dict[str, Any]]:
    jobs = []
    for path in sorted(EXAMPLES.glob("ulmfitjob*.yaml")):
        jobs += [d for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] == "ULMFiTJob"]
    return jobs


JOBS = example_jobs()


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON-like document."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths_of(item, (*prefix, index))
    return found


def replaced(document: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[path[0]] = replaced(document[path[0]], path[1:], value)
    return copy


@st.composite
def mutated_jobs(draw: st.DrawFn) -> dict[str, Any]:
    """An example job with one value somewhere in it replaced by an arbitrary JSON value."""
    job = draw(st.sampled_from(JOBS))
    path = draw(st.sampled_from(paths_of(job)))
    return replaced(job, path, draw(json_values))


def test_the_examples_parse() -> None:
    assert len(JOBS) >= 5
    for job in JOBS:
        parse_spec(job["spec"])


@FUZZ
@given(mutated_jobs())
def test_a_mutated_spec_parses_or_names_the_field(job: dict[str, Any]) -> None:
    try:
        parse_spec(job.get("spec") if isinstance(job, dict) else job)
    except InvalidSpec as error:
        assert error.problems
        for field, _value, message in error.problems:
            assert isinstance(field, str) and message


@FUZZ
@given(st.one_of(st.text(max_size=300), mutated_jobs().map(yaml.safe_dump)))
def test_any_job_file_loads_or_is_invalid_spec(text: str) -> None:
    try:
        assert isinstance(load_job_file(text), ULMFiTJob)
    except InvalidSpec as error:
        assert str(error)


RECORD = CheckpointRecord(
    stage="finetune", tag="final", step=3, final=True, files=[], meta={"metrics": {"loss": 1.0}}
).to_wire()


ESCAPES = ["../escape", "../../escape", "/escape", "a/../../escape", "..", "a\\..\\escape"]


@st.composite
def meta_bodies(draw: st.DrawFn) -> bytes:
    """meta.json bodies: raw bytes, arbitrary JSON, or a real record with one value replaced."""
    kind = draw(st.integers(0, 3))
    if kind == 3:  # a file list that tries to reach outside the checkpoint
        path = draw(st.sampled_from(ESCAPES) | st.text(max_size=30))
        files = [{"path": path, "size": 1, "sha256": "0" * 64}]
        return json.dumps({**RECORD, "files": files}).encode()
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    path = draw(st.sampled_from(paths_of(RECORD)))
    return json.dumps(replaced(RECORD, path, draw(json_values))).encode()


@FUZZ
@given(meta_bodies())
def test_a_checkpoint_record_parses_or_is_a_value_error(body: bytes) -> None:
    try:
        record = parse_checkpoint_record(body)
    except ValueError as error:
        assert str(error)
        return
    assert isinstance(record.files, list)


@FUZZ
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_progress_parses_or_is_none(body: bytes) -> None:
    parse_progress(body)  # returns a record or None; anything raised fails the test


@FUZZ
@given(body=meta_bodies())
def test_the_store_reports_a_bad_record_as_corrupt_and_never_writes_outside(
    tmp_path_factory: pytest.TempPathFactory, body: bytes
) -> None:
    root = tmp_path_factory.mktemp("store")
    checkpoints = CheckpointStore(LocalStore(root / "store"), "ns/job")
    checkpoints.store.put_bytes("ns/job/finetune/final/meta.json", body)
    checkpoints.committed("finetune")  # a corrupt record is skipped with a warning
    with contextlib.suppress(CheckpointCorrupt, NoCheckpoint):
        checkpoints.load("finetune", root / "load" / "here")
    assert not (root / "escape").exists() and not (root / "load" / "escape").exists()
