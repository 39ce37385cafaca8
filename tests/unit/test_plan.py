"""The plan: a DAG of stages, what each depends on and starts from, identical for both runners."""

from __future__ import annotations

import pytest
from ulmfit_operator.api import parse_job
from ulmfit_operator.plan import Plan, make_plan
from ulmfit_trainer.config import StageConfig, StageName

pytestmark = pytest.mark.timeout(60)

TUNE = {"space": {"learningRate": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}}


def cotrain(*models: str, rounds: int = 1, **extra) -> dict:
    return {
        "models": [
            {"name": name, "rules": [{"label": "x", "keywords": [name]}]} for name in models
        ],
        "minAgreement": 1,
        "rounds": rounds,
        **extra,
    }


def job(stages: dict | None = None) -> dict:
    return {
        "apiVersion": "ulmfit.io/v1alpha1",
        "kind": "ULMFiTJob",
        "metadata": {"name": "demo", "namespace": "team"},
        "spec": {"stages": stages or {}},
    }


def plan_of(stages: dict) -> Plan:
    return make_plan(parse_job(job(stages)), "/store")


def assert_topological(plan: Plan) -> None:
    seen: set[str] = set()
    for stage in plan.stages:
        assert set(stage.depends_on) <= seen, f"{stage.name} comes before {stage.depends_on}"
        seen.add(stage.name)
    assert len(seen) == len(plan.stages), "stage keys are unique"


def test_full_pipeline_chains_each_stage_to_the_one_before() -> None:
    plan = plan_of({"pretrain": {"enabled": True}})
    assert plan.names == ["pretrain", "finetune", "classifier", "evaluate"]
    assert [s.depends_on for s in plan.stages] == [
        (),
        ("pretrain",),
        ("finetune",),
        ("classifier",),
    ]
    assert [s.init_from for s in plan.stages] == [None, "pretrain", "finetune", "classifier"]
    assert [s.distributed for s in plan.stages] == [True, True, True, False]
    assert [s.kind for s in plan.stages] == list(plan.names)
    assert plan.ready({"pretrain", "finetune"}) == [plan.stage("classifier")]
    assert plan.ready(set(plan.names)) == []


def test_disabled_stages_drop_out_and_the_chain_closes_over_them() -> None:
    plan = plan_of({"finetune": {"enabled": False}})
    assert plan.names == ["classifier", "evaluate"]
    assert plan.stage(StageName.CLASSIFIER).depends_on == ()
    assert plan.stage(StageName.CLASSIFIER).init_from is None
    assert plan.ready(set()) == [plan.stage("classifier")]


def test_stage_configs_carry_their_hyperparameters_and_survive_json(tmp_path) -> None:
    plan = plan_of({"finetune": {"learningRate": 0.01}})
    finetune = plan.stage("finetune").config
    assert finetune.run == "team/demo"
    assert finetune.lm is not None and finetune.lm.learning_rate == 0.01
    assert finetune.classifier is None
    path = tmp_path / "stage.json"
    finetune.write(path)
    assert StageConfig.read(path) == finetune
    assert plan.stage("evaluate").config.classifier is not None


def test_cotrain_models_of_a_round_run_side_by_side_after_the_lm() -> None:
    plan = plan_of({"cotrain": cotrain("rules", "tail", rounds=2)})
    assert_topological(plan)
    assert plan.names == [
        "finetune",
        "cotrain-rules",
        "cotrain-tail",
        "cotrain-rules-r2",
        "cotrain-tail-r2",
        "classifier",
        "evaluate",
    ]
    first = [plan.stage("cotrain-rules"), plan.stage("cotrain-tail")]
    second = [plan.stage("cotrain-rules-r2"), plan.stage("cotrain-tail-r2")]
    for stage in first:
        assert stage.kind == StageName.COTRAIN and stage.distributed
        assert stage.depends_on == ("finetune",)
        assert stage.config.cotrain_round == 1 and stage.config.pseudo_labels_from == []
    for stage in second:
        assert stage.depends_on == ("cotrain-rules", "cotrain-tail")
        assert stage.config.cotrain_round == 2
        assert stage.config.pseudo_labels_from == ["cotrain-rules", "cotrain-tail"]
    for stage in first + second:
        assert stage.init_from == "finetune"
        assert stage.config.key == stage.name
    assert [s.config.cotrain_model for s in first + second] == ["rules", "tail"] * 2
    classifier = plan.stage("classifier")
    assert classifier.depends_on == ("cotrain-rules-r2", "cotrain-tail-r2")
    assert classifier.config.pseudo_labels_from == ["cotrain-rules-r2", "cotrain-tail-r2"]
    assert classifier.init_from == "finetune" and classifier.config.tuned_by is None
    # Both models of round 1 are ready together, and round 2 only once both are done.
    assert plan.ready({"finetune"}) == first
    assert plan.ready({"finetune", "cotrain-rules"}) == [first[1]]
    assert plan.ready({"finetune", *[s.name for s in first]}) == second


def test_cotrain_models_use_their_own_hyperparameters_when_given() -> None:
    plan = plan_of({"cotrain": cotrain("a", classifier={"learningRate": 0.05})})
    config = plan.stage("cotrain-a").config
    assert config.classifier is not None and config.classifier.learning_rate == 0.05
    assert plan.stage("classifier").config.classifier.learning_rate == 0.002  # type: ignore[union-attr]


def test_tune_runs_after_cotrain_and_tunes_the_classifier() -> None:
    plan = plan_of({"cotrain": cotrain("a", "b"), "tune": TUNE})
    assert_topological(plan)
    assert plan.names == ["finetune", "cotrain-a", "cotrain-b", "tune", "classifier", "evaluate"]
    tune = plan.stage("tune")
    assert tune.kind == StageName.TUNE and not tune.distributed
    assert tune.depends_on == ("cotrain-a", "cotrain-b")
    assert tune.config.pseudo_labels_from == ["cotrain-a", "cotrain-b"]
    assert tune.config.tune is not None and tune.init_from == "finetune"
    classifier = plan.stage("classifier")
    assert classifier.depends_on == ("tune",)
    assert classifier.config.tuned_by == "tune"
    assert classifier.config.pseudo_labels_from == ["cotrain-a", "cotrain-b"]


def test_tune_without_cotrain_or_lm_stages() -> None:
    plan = plan_of({"finetune": {"enabled": False}, "tune": TUNE})
    assert plan.names == ["tune", "classifier", "evaluate"]
    assert plan.stage("tune").depends_on == () and plan.stage("tune").init_from is None
    assert plan.stage("tune").config.pseudo_labels_from == []
    assert plan.stage("classifier").depends_on == ("tune",)
    assert plan.ready(set()) == [plan.stage("tune")]


def test_stage_keys_and_configs_round_trip_through_json(tmp_path) -> None:
    plan = plan_of({"cotrain": cotrain("a", rounds=3), "tune": TUNE})
    assert "cotrain-a-r3" in plan.names
    for stage in plan.stages:
        path = tmp_path / f"{stage.name}.json"
        stage.config.write(path)
        assert StageConfig.read(path) == stage.config
        assert StageConfig.read(path).key == stage.name


def test_in_the_cluster_every_stage_runs_under_the_job_instance_uid() -> None:
    """The operator's plan (the job has a UID) puts every stage, and so every checkpoint,
    progress record and export, under `<namespace>/<name>/<uid>`; the local runner's (no UID)
    under `<namespace>/<name>`, so a rerun resumes by name."""
    stages = {"pretrain": {"enabled": True}, "cotrain": cotrain("a"), "tune": TUNE}
    document = job(stages)
    local = make_plan(parse_job(document), "/store")
    uid = "3a1f5c9e-7b2d-4e6f-8a0b-1c2d3e4f5a6b"
    document["metadata"]["uid"] = uid
    cluster = make_plan(parse_job(document), "s3://bucket/runs")
    assert local.names == cluster.names
    assert local.run == "team/demo"
    assert {stage.config.run for stage in local.stages} == {"team/demo"}
    assert cluster.run == f"team/demo/{uid}"
    assert {stage.config.run for stage in cluster.stages} == {f"team/demo/{uid}"}
    # Apart from the run path (and the store root), the configs are the same.
    for mine, theirs in zip(local.stages, cluster.stages, strict=True):
        assert (
            mine.config.model_copy(update={"run": cluster.run, "store_root": "s3://bucket/runs"})
            == theirs.config
        )
