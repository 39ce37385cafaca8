"""ULMFiT's ingredients, one at a time, on the embedded data with the packaged MiniLM backbone.

The rows of the paper's ablations (Howard & Ruder 2018, Tables 5 and 6), each adding one
ingredient to the row before it; every other setting is the embedded example's
(`examples/ulmfitjob.yaml`):
  * `scratch`: no pretrained model: the small GPT shape and BPE tokenizer of
    `examples/ulmfitjob-scratch.yaml`, random weights, the classifier stage alone;
  * `pretrained`: MiniLM, plain fine-tuning: everything trained at once at one constant rate
    (no LM fine-tuning, no discriminative rates, no slanted triangular schedule, no unfreezing);
  * `+lm-finetune`: LM fine-tuning on the task's text first (with its head warm-up);
  * `+discr+stlr`: discriminative rates (factor 2.6) and the slanted triangular schedule;
  * `+gradual-unfreezing`: the classifier's layer groups unfrozen in 3 phases (full ULMFiT).
Each row runs at each label count (`--labels`, `all` for every labeled document) with each seed
(`--seeds`). Every column gets the same training budget, so columns differ in labels alone: the
classifier's epochs shrink as labels grow (x 100 / labels), and so do the LM fine-tuning's, which
reads the labeled texts too (x (unlabeled + 100) / (unlabeled + labels)); every run takes about as
many optimizer steps as at 100 labels. Prints one JSON line per run (test error, seconds), one
per row and label count (mean test error over the seeds with min and max), and a Markdown table:

    python benchmarks/ulmfit_ablations.py [--labels 100,all] [--seeds 42,43,44] [--rows ...]

`--smoke` shrinks everything (a few documents, one short phase) to check the script end to end.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from ulmfit_lowshot import run  # noqa: E402  (`ulmfit run` on a job: test error, seconds)

PRETRAINED = ROOT / "examples" / "ulmfitjob.yaml"
SCRATCH = ROOT / "examples" / "ulmfitjob-scratch.yaml"
ROWS = ("scratch", "pretrained", "+lm-finetune", "+discr+stlr", "+gradual-unfreezing")
BASE_LABELS = 100
"""The label count the embedded example's classifier epochs are sized for."""
ALL_LABELS = 3161
"""Labeled documents in the embedded dataset's train split."""


def row_job(row: str, labels: int | None, seed: int, smoke: bool) -> dict[str, Any]:
    """The ULMFiTJob of one run: the embedded example, with `row`'s ingredients."""
    job = copy.deepcopy(yaml.safe_load(PRETRAINED.read_text()))
    spec = job["spec"]
    spec["seed"] = seed
    data = spec["data"]
    data.pop("maxTrainExamples", None)
    if labels is not None:
        data["maxTrainExamples"] = labels
    stages = spec["stages"]
    classifier = stages["classifier"]
    labeled = labels or ALL_LABELS
    for field in ("epochsPerPhase", "finalEpochs"):
        classifier[field] = round(float(classifier[field]) * min(1.0, BASE_LABELS / labeled), 3)
    finetune = stages["finetune"]
    unlabeled = int(data["maxUnlabeledExamples"])
    budget = (unlabeled + BASE_LABELS) / (unlabeled + labeled)
    finetune["epochs"] = round(float(finetune["epochs"]) * min(1.0, budget), 3)
    index = ROWS.index(row)
    if row == "scratch":
        example = yaml.safe_load(SCRATCH.read_text())["spec"]
        spec["model"] = example["model"]
        spec["tokenizer"] = example["tokenizer"]
    if index < 2:  # no LM fine-tuning on the task's own text
        stages["finetune"] = {"enabled": False}
    if index < 3:  # one constant rate for every layer
        classifier.update(discriminativeFactor=1.0, lrRatio=1.0, cutFrac=0.01)
        classifier["learningRate"] = 5e-5 if index > 0 else classifier["learningRate"]
    if index < 4:  # everything trained at once, for as many epochs as the phases would take
        phases = int(classifier.get("unfreezePhases", 1))
        total = classifier["epochsPerPhase"] * phases + classifier["finalEpochs"]
        classifier.update(unfreezePhases=1, epochsPerPhase=round(total, 3), finalEpochs=0)
    if smoke:
        data.update(maxTrainExamples=16, maxUnlabeledExamples=16, maxEvalExamples=16, maxLength=16)
        classifier.update(unfreezePhases=1, epochsPerPhase=1, finalEpochs=0)
        if "finetune" in stages and stages["finetune"].get("enabled", True):
            stages["finetune"].update(epochs=0.05, maxSteps=2)
        stages.pop("pretrain", None)
    name = row.strip("+").replace("+", "-")
    job["metadata"] = {"name": f"{name}-{labels or 'all'}-s{seed}"}
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", default="100,all", help="comma-separated; `all` for every one")
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"some of {', '.join(ROWS)}")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny runs: checks the script only")
    args = parser.parse_args()
    label_counts = [None if x == "all" else int(x) for x in args.labels.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ulmfit-ablations-"))
    workdir.mkdir(parents=True, exist_ok=True)

    table: dict[tuple[str, str], list[float]] = {}
    for labels in label_counts:
        for row in rows:
            errors = []
            for seed in seeds:
                error, seconds = run(row_job(row, labels, seed, args.smoke), workdir, args.nproc)
                errors.append(error)
                print(json.dumps({
                    "name": f"test_error[{row}, labels={labels or 'all'}, seed={seed}]",
                    "value": round(error, 4), "unit": "fraction", "seconds": round(seconds, 1),
                }), flush=True)  # fmt: skip
            table[(row, str(labels or "all"))] = errors
            print(json.dumps({
                "name": f"test_error[{row}, labels={labels or 'all'}]",
                "value": round(statistics.mean(errors), 4), "unit": "fraction",
                "min": round(min(errors), 4), "max": round(max(errors), 4), "seeds": len(errors),
            }), flush=True)  # fmt: skip
    columns = [str(labels or "all") for labels in label_counts]
    print("\n| row | " + " | ".join(f"test error, {c} labels" for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for column in columns:
            errors = table[(row, column)]
            cells.append(f"{statistics.mean(errors):.3f} ({min(errors):.3f}–{max(errors):.3f})")
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
