"""ULMFiT's low-shot claim on the embedded data: does LM pretraining make 100 labels worth more?

Runs, in one go and with the same model shape and classifier settings as the from-scratch example
(`examples/ulmfitjob-scratch.yaml`)
(the classifier's epochs scaled up as labels shrink, so every run takes a comparable number of
optimizer steps: 100 labels are only a few batches per epoch):
  * `ulmfit-100`: the full pipeline (LM pretraining, LM fine-tuning, classifier) with 100 labels;
  * `scratch-100`: the classifier alone, from random weights, on the same 100 labels;
  * `scratch-1000`: the classifier alone on 10x more labels (the paper's comparison point).
Prints one JSON line per run (test error) plus the ratios, each measured in this run:
    python benchmarks/ulmfit_lowshot.py [--labels 100] [--nproc 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ulmfitjob-scratch.yaml"


FULL_TRAIN_EXAMPLES = 3161
"""Labeled training documents of the embedded data: the example's classifier epochs fit these."""
MAX_EPOCH_SCALE = 20.0


def variant(
    base: dict,
    name: str,
    labels: int,
    pretrained_lm: bool,
    unlabeled: int | None,
    pretrain_epochs: float | None,
) -> dict:
    job = copy.deepcopy(base)
    job["metadata"] = {"name": name}
    spec = job["spec"]
    spec.setdefault("data", {})["maxTrainExamples"] = labels
    if unlabeled is not None:
        spec["data"]["maxUnlabeledExamples"] = unlabeled
    stages = spec.setdefault("stages", {})
    if pretrain_epochs is not None:
        stages.setdefault("pretrain", {})["epochs"] = pretrain_epochs
    classifier = stages.setdefault("classifier", {})
    scale = min(MAX_EPOCH_SCALE, FULL_TRAIN_EXAMPLES / labels)
    for field, default in (("epochsPerPhase", 1.0), ("finalEpochs", 2.0)):
        classifier[field] = round(float(classifier.get(field, default)) * scale, 2)
    if not pretrained_lm:
        stages["pretrain"] = {**stages.get("pretrain", {}), "enabled": False}
        stages["finetune"] = {**stages.get("finetune", {}), "enabled": False}
    return job


def run_job(job: dict, workdir: Path, nproc: int) -> tuple[dict, float]:
    """(`result.json`, seconds) of `ulmfit run` on `job` in `workdir/<its name>`; exits with the
    run's output when it fails. The other benchmarks that run jobs locally use it too."""
    name = job["metadata"]["name"]
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "ulmfit_operator.cli", "run", str(path),
         "--workdir", str(workdir / name), "--nproc", str(nproc)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise SystemExit(f"{name} failed ({completed.returncode})")
    result = json.loads((workdir / name / "result.json").read_text())
    return result, time.monotonic() - started


def run(job: dict, workdir: Path, nproc: int) -> tuple[float, float]:
    """(test error, seconds) of `ulmfit run` on `job`."""
    result, seconds = run_job(job, workdir, nproc)
    return 1.0 - float(result["test"]["accuracy"]), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--unlabeled", type=int, default=None,
        help="unlabeled texts for LM pretraining (default: the example's maxUnlabeledExamples)",
    )  # fmt: skip
    parser.add_argument(
        "--pretrain-epochs", type=float, default=None,
        help="LM pretraining epochs (default: the example's)",
    )  # fmt: skip
    args = parser.parse_args()
    base = yaml.safe_load(EXAMPLE.read_text())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ulmfit-lowshot-"))
    workdir.mkdir(parents=True, exist_ok=True)

    runs = {
        f"ulmfit-{args.labels}": variant(
            base, f"ulmfit-{args.labels}", args.labels, True, args.unlabeled, args.pretrain_epochs
        ),
        f"scratch-{args.labels}": variant(
            base, f"scratch-{args.labels}", args.labels, False, args.unlabeled, None
        ),
        f"scratch-{args.labels * 10}": variant(
            base, f"scratch-{args.labels * 10}", args.labels * 10, False, args.unlabeled, None
        ),
    }
    errors = {}
    for name, job in runs.items():
        errors[name], seconds = run(job, workdir, args.nproc)
        line = {"name": f"test_error_{name}", "value": round(errors[name], 4),
                "unit": "fraction", "seconds": round(seconds, 1)}  # fmt: skip
        print(json.dumps(line), flush=True)
    ours = errors[f"ulmfit-{args.labels}"]
    for name in (f"scratch-{args.labels}", f"scratch-{args.labels * 10}"):
        print(json.dumps({
            "name": f"error_ulmfit_{args.labels}_vs_{name}", "value": round(ours, 4),
            "unit": "fraction", "baseline": round(errors[name], 4),
            "ratio": round(ours / errors[name], 3) if errors[name] else None,
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
