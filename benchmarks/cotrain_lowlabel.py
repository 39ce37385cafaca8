"""Co-training on weak labels at 50 gold labels: is the option worth keeping?

Runs, in one go, two variants of examples/ulmfitjob-cotrain.yaml through `ulmfit run`:
  * `cotrain-50`: the example as it is (50 gold labels, two co-trained models on keyword rules,
    their confident agreements added to the final classifier's training set);
  * `gold-50`: the same job without the `cotrain` section (the 50 gold labels alone).
Prints one JSON line per run (test error), the error ratio, and the pseudo-labels' accuracy
against the rules' accuracy (both scored on the train documents that `maxTrainExamples` left
unused, whose gold labels the models never see):
    python benchmarks/cotrain_lowlabel.py [--labels 50] [--nproc 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from ulmfit_lowshot import run_job  # noqa: E402  (`ulmfit run` on a job: result, seconds)

EXAMPLE = ROOT / "examples" / "ulmfitjob-cotrain.yaml"


def variant(base: dict, name: str, labels: int, cotrain: bool) -> dict:
    job = copy.deepcopy(base)
    job["metadata"] = {"name": name}
    spec = job["spec"]
    spec["data"]["maxTrainExamples"] = labels
    if not cotrain:
        del spec["stages"]["cotrain"]
    return job


def emit(**line: object) -> None:
    print(json.dumps(line), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=50)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    base = yaml.safe_load(EXAMPLE.read_text())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ulmfit-cotrain-"))
    workdir.mkdir(parents=True, exist_ok=True)

    ours, baseline = f"cotrain-{args.labels}", f"gold-{args.labels}"
    results, errors = {}, {}
    for name, cotrain in ((baseline, False), (ours, True)):
        job = variant(base, name, args.labels, cotrain)
        results[name], seconds = run_job(job, workdir, args.nproc)
        errors[name] = 1.0 - float(results[name]["test"]["accuracy"])
        emit(name=f"test_error_{name}", value=round(errors[name], 4), unit="fraction",
             seconds=round(seconds, 1))  # fmt: skip
    emit(
        name=f"error_{ours}_vs_{baseline}", value=round(errors[ours], 4), unit="fraction",
        baseline=round(errors[baseline], 4),
        ratio=round(errors[ours] / errors[baseline], 3) if errors[baseline] else None,
    )  # fmt: skip
    pseudo = results[ours].get("pseudoLabels") or {}
    emit(name="pseudo_labels", value=pseudo.get("total"), unit="documents",
         per_class=pseudo.get("perClass"))  # fmt: skip
    accuracy, weak = pseudo.get("accuracy"), pseudo.get("weakLabelAccuracy")
    if accuracy is not None and weak is not None:
        emit(
            name="pseudo_label_accuracy_vs_rules", value=round(accuracy, 4), unit="fraction",
            baseline=round(weak, 4), ratio=round(accuracy / weak, 3) if weak else None,
        )  # fmt: skip


if __name__ == "__main__":
    main()
