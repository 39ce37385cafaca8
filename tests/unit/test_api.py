"""The job spec: defaults, camelCase wire format, and clear errors for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ulmfit_operator.api import ULMFiTJob, load_job_file, parse_job, parse_spec
from ulmfit_trainer.errors import InvalidSpec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def job(**spec: object) -> dict:
    return {
        "apiVersion": "ulmfit.io/v1alpha1",
        "kind": "ULMFiTJob",
        "metadata": {"name": "demo"},
        "spec": spec,
    }


def test_defaults_fill_an_empty_spec() -> None:
    parsed = parse_job(job())
    assert parsed.run_id == "default/demo"
    assert parsed.spec.stages.finetune.discriminative_factor == 2.6
    assert parsed.spec.stages.finetune.cut_frac == 0.1
    assert parsed.spec.stages.finetune.lr_ratio == 32
    assert parsed.spec.deepspeed.zero_stage == 2
    assert parsed.spec.stages.pretrain.enabled is False


def test_wire_format_is_camel_case_and_round_trips() -> None:
    parsed = parse_job(job(data={"maxLength": 64}, runPolicy={"backoffLimit": 1}))
    wire = parsed.to_wire()
    assert wire["spec"]["data"]["maxLength"] == 64
    assert wire["spec"]["runPolicy"]["backoffLimit"] == 1
    assert "max_length" not in wire["spec"]["data"]
    assert parse_job(wire) == parsed


@pytest.mark.parametrize(
    ("spec", "field", "value"),
    [
        (
            {"stages": {"classifier": {"learningRate": -1}}},
            "spec.stages.classifier.learningRate",
            -1,
        ),
        ({"stages": {"finetune": {"cutFrac": 1.5}}}, "spec.stages.finetune.cutFrac", 1.5),
        ({"stages": {"finetune": {"epochs": 0}}}, "spec.stages.finetune.epochs", 0),
        ({"stages": {"classifier": {"loss": "hinge"}}}, "spec.stages.classifier.loss", "hinge"),
        (
            {"stages": {"classifier": {"labelSmoothing": 1.0}}},
            "spec.stages.classifier.labelSmoothing",
            1.0,
        ),
        ({"stages": {"classfier": {}}}, "spec.stages.classfier", {}),
        ({"model": {"family": "seq2seq"}}, "spec.model.family", "seq2seq"),
        (
            {"model": {"architecture": {"hiddenSize": 100, "heads": 3}}},
            "spec.model.architecture",
            None,
        ),
        ({"data": {"maxLength": 512}}, "spec", None),
        ({"data": {"maxLength": "long"}}, "spec.data.maxLength", "long"),
        ({"tokenizer": {"vocabSize": 10}}, "spec.tokenizer.vocabSize", 10),
        ({"deepspeed": {"zeroStage": 4}}, "spec.deepspeed.zeroStage", 4),
        ({"deepspeed": {"precision": "fp8"}}, "spec.deepspeed.precision", "fp8"),
        ({"resources": {"workers": 0}}, "spec.resources.workers", 0),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory", "lots"),
        ({"resources": {"gpusPerWorker": 1, "processesPerWorker": 2}}, "spec.resources", None),
        ({"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit", -1),
        ({"storage": {"s3": {"bucket": "b"}}}, "spec.storage.s3.endpoint", None),
        ({"seed": -3}, "spec.seed", -3),
    ],
)
def test_bad_spec_names_field_and_value(spec: dict, field: str, value: object) -> None:
    with pytest.raises(InvalidSpec) as raised:
        parse_job(job(**spec))
    fields = [problem[0] for problem in raised.value.problems]
    assert field in fields, raised.value.problems
    if value is not None:
        assert value in [problem[1] for problem in raised.value.problems]
        assert repr(value) in str(raised.value)


def test_cross_field_messages_say_what_conflicts() -> None:
    with pytest.raises(InvalidSpec, match=r"maxLength 512 exceeds model\.architecture"):
        parse_job(job(data={"maxLength": 512}))
    with pytest.raises(InvalidSpec, match="must be a multiple of heads 3"):
        parse_job(job(model={"architecture": {"hiddenSize": 100, "heads": 3}}))


def test_pretrained_model_lifts_the_context_check() -> None:
    parsed = parse_job(job(data={"maxLength": 512}, model={"pretrained": "s3://models/gpt2"}))
    assert parsed.spec.data.max_length == 512


def test_metadata_name_must_be_a_dns_label() -> None:
    document = job()
    document["metadata"]["name"] = "Bad_Name"
    with pytest.raises(InvalidSpec, match=r"metadata\.name"):
        parse_job(document)


def test_parse_spec_prefixes_paths_with_spec() -> None:
    with pytest.raises(InvalidSpec) as raised:
        parse_spec({"seed": "x"})
    assert raised.value.problems[0][0] == "spec.seed"


def test_file_loader_picks_the_job_among_other_documents() -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"}}
    text = yaml.safe_dump_all([secret, job(seed=7)])
    assert load_job_file(text).spec.seed == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spec: [unclosed", "not valid YAML"),
        ("kind: Secret\n", "expected exactly one ULMFiTJob"),
        (yaml.safe_dump_all([job(), job()]), "expected exactly one ULMFiTJob"),
    ],
)
def test_file_loader_rejects_files_without_exactly_one_job(text: str, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        load_job_file(text)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("ulmfitjob*.yaml")), ids=lambda p: p.name)
def test_every_example_is_a_valid_job(path: Path) -> None:
    assert isinstance(load_job_file(path.read_text()), ULMFiTJob)
