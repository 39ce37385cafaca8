"""The job spec: defaults, camelCase wire format, and clear errors for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ulmfit_operator.api import ULMFiTJob, load_job_file, parse_job, parse_spec
from ulmfit_trainer.config import is_store_key
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
        ({"data": {"dataset": ""}}, "spec.data.dataset", ""),
        ({"data": {"dataset": " "}}, "spec.data.dataset", " "),
        ({"data": {"dataset": "s3://"}}, "spec.data.dataset", "s3://"),
        ({"data": {"dataset": "s3:///train"}}, "spec.data.dataset", "s3:///train"),
        ({"data": {"dataset": "s3://data"}}, "spec.data.dataset", "s3://data"),
        ({"data": {"dataset": "s3://Data_Set/x"}}, "spec.data.dataset", "s3://Data_Set/x"),
        ({"model": {"pretrained": "s3:///gpt2"}}, "spec.model.pretrained", "s3:///gpt2"),
        ({"tokenizer": {"pretrained": "s3://"}}, "spec.tokenizer.pretrained", "s3://"),
        (
            {"model": {"family": "masked"}, "stages": {"classifier": {"head": "generative"}}},
            "spec",
            None,
        ),
        ({"deepspeed": {"precision": "fp16"}}, "spec", None),
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


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"data": {"dataset": ""}},
            "spec.data.dataset: dataset '' is empty: give builtin://NAME, s3://bucket/key or a "
            "directory",
        ),
        (
            {"data": {"dataset": "s3:///train"}},
            "spec.data.dataset: dataset 's3:///train' is not an s3://bucket/key URI: it needs a "
            "bucket name",
        ),
        (
            {"model": {"pretrained": "s3://"}},
            "spec.model.pretrained: pretrained 's3://' is not an s3://bucket/key URI",
        ),
        (
            {"tokenizer": {"pretrained": "s3://models"}},
            "spec.tokenizer.pretrained: pretrained 's3://models' is not an s3://bucket/key URI",
        ),
        (
            {"model": {"family": "masked"}, "stages": {"classifier": {"head": "generative"}}},
            "spec: stages.classifier.head 'generative' needs a causal LM, but model.family is "
            "'masked': use the concat, attention or hierarchical head",
        ),
        (
            {
                "model": {"family": "masked"},
                "stages": {
                    "cotrain": {
                        "models": [{"name": "a"}],
                        "minAgreement": 1,
                        "classifier": {"head": "generative"},
                    }
                },
            },
            "spec: stages.cotrain.classifier.head 'generative' needs a causal LM, but "
            "model.family is 'masked'",
        ),
        (
            {"deepspeed": {"precision": "fp16"}, "resources": {"gpusPerWorker": 0}},
            "spec: deepspeed.precision 'fp16' needs GPUs, but resources.gpusPerWorker is 0: "
            "on CPU use bf16 or fp32",
        ),
    ],
    ids=[
        "empty-dataset", "s3-no-bucket", "s3-model", "s3-whole-bucket", "generative-masked",
        "generative-masked-cotrain", "fp16-on-cpu",
    ],
)  # fmt: skip
def test_specs_that_cannot_run_are_refused_naming_field_and_value(spec: dict, message: str) -> None:
    with pytest.raises(InvalidSpec) as raised:
        parse_spec(spec)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    "spec",
    [
        {"data": {"dataset": "s3://ulmfit-data/tickets/"}},
        {"data": {"dataset": "data/tickets"}},
        {"data": {"dataset": "file:///srv/data"}},
        {"model": {"pretrained": "s3://models/gpt2"}, "tokenizer": {"pretrained": "/models/gpt2"}},
        {"model": {"pretrained": None}, "tokenizer": {"pretrained": None}},
        {"stages": {"classifier": {"head": "generative"}}},
        {
            "model": {"family": "masked"},
            "stages": {
                "classifier": {"head": "attention"},
                "cotrain": {"models": [{"name": "a"}], "minAgreement": 1},
            },
        },
        {
            "model": {"family": "masked"},
            "stages": {
                "cotrain": {
                    "models": [{"name": "a"}],
                    "minAgreement": 1,
                    "classifier": {"head": "hierarchical"},
                }
            },
        },
        {"deepspeed": {"precision": "bf16"}},
        {"deepspeed": {"precision": "fp32"}},
        {"deepspeed": {"precision": "fp16"}, "resources": {"gpusPerWorker": 1}},
    ],
    ids=[
        "s3-dataset", "relative-dir", "file-uri", "s3-model", "no-pretrained",
        "generative-causal", "masked-attention", "masked-cotrain-hierarchical", "bf16-on-cpu",
        "fp32-on-cpu", "fp16-on-gpu",
    ],
)  # fmt: skip
def test_specs_next_to_the_refused_ones_still_pass(spec: dict) -> None:
    parse_spec(spec)


def test_pretrained_model_lifts_the_context_check() -> None:
    parsed = parse_job(job(data={"maxLength": 512}, model={"pretrained": "s3://models/gpt2"}))
    assert parsed.spec.data.max_length == 512


def test_metadata_name_must_be_a_dns_label() -> None:
    document = job()
    document["metadata"]["name"] = "Bad_Name"
    with pytest.raises(InvalidSpec, match=r"metadata\.name"):
        parse_job(document)


def test_run_id_carries_the_uid_in_the_cluster_and_is_by_name_without_one() -> None:
    """Each instance of a job owns its store path: the cluster's UID makes a re-created job a
    new run; the local runner (no UID) resumes by name."""
    local = parse_job(job())
    assert local.metadata.uid is None and local.run_id == "default/demo"
    assert "uid" not in local.to_wire()["metadata"]  # `ulmfit validate` prints no UID
    first, second = (
        parse_job({**job(), "metadata": {"name": "demo", "namespace": "team", "uid": uid}})
        for uid in ("6f1c2d3e-0000-4a5b-8c9d-0123456789ab", "0b9e7f61-1111-4c2d-9e8f-fedcba987654")
    )
    assert first.run_id == "team/demo/6f1c2d3e-0000-4a5b-8c9d-0123456789ab"
    assert second.run_id == "team/demo/0b9e7f61-1111-4c2d-9e8f-fedcba987654"
    assert is_store_key(first.run_id) and first.run_id != second.run_id
    # An empty UID is no UID.
    assert parse_job({**job(), "metadata": {"name": "demo", "uid": ""}}).run_id == "default/demo"


@pytest.mark.parametrize("uid", ["..", "a/b", "x y", "a" * 129])
def test_a_uid_that_is_no_store_key_segment_is_rejected(uid: str) -> None:
    with pytest.raises(InvalidSpec, match=r"metadata\.uid"):
        parse_job({**job(), "metadata": {"name": "demo", "uid": uid}})


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
