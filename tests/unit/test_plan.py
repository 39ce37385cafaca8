"""The plan: stage order, what each stage starts from, and identical configs for both runners."""

from __future__ import annotations

from ulmfit_operator.api import parse_job
from ulmfit_operator.plan import make_plan
from ulmfit_trainer.config import StageConfig, StageName


def job(stages: dict | None = None) -> dict:
    return {
        "apiVersion": "ulmfit.io/v1alpha1",
        "kind": "ULMFiTJob",
        "metadata": {"name": "demo", "namespace": "team"},
        "spec": {"stages": stages or {}},
    }


def test_full_pipeline_chains_each_stage_to_the_one_before() -> None:
    plan = make_plan(parse_job(job({"pretrain": {"enabled": True}})), "/store")
    assert plan.names == ["pretrain", "finetune", "classifier", "evaluate"]
    assert [s.depends_on for s in plan.stages] == [None, "pretrain", "finetune", "classifier"]
    assert [s.distributed for s in plan.stages] == [True, True, True, False]
    assert plan.after("finetune") is plan.stage("classifier")
    assert plan.after("evaluate") is None


def test_disabled_stages_drop_out_and_the_chain_closes_over_them() -> None:
    plan = make_plan(parse_job(job({"finetune": {"enabled": False}})), "/store")
    assert plan.names == ["classifier", "evaluate"]
    assert plan.stage(StageName.CLASSIFIER).depends_on is None


def test_stage_configs_carry_their_hyperparameters_and_survive_json(tmp_path) -> None:
    plan = make_plan(parse_job(job({"finetune": {"learningRate": 0.01}})), "/store")
    finetune = plan.stage("finetune").config
    assert finetune.run == "team/demo"
    assert finetune.lm is not None and finetune.lm.learning_rate == 0.01
    assert finetune.classifier is None
    path = tmp_path / "stage.json"
    finetune.write(path)
    assert StageConfig.read(path) == finetune
    assert plan.stage("evaluate").config.classifier is not None
