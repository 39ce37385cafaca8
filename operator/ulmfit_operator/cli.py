"""`ulmfit`: run a ULMFiTJob locally, validate and plan it, render the CRD, run the operator."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from ulmfit_trainer.errors import InvalidSpec, UlmfitError

from ulmfit_operator.api import ULMFiTJob, load_job_file
from ulmfit_operator.settings import OperatorSettings, operator_command
from ulmfit_operator.terminal.commands import register as register_terminal_commands

EXIT_INVALID_SPEC = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

app = typer.Typer(
    help="ULMFiT text classifiers: one YAML for `kubectl apply` and for this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

JobFile = Annotated[
    Path, typer.Argument(help="A ULMFiTJob YAML (the same file `kubectl apply -f` takes).")
]


def _load(path: Path) -> ULMFiTJob:
    try:
        text = path.read_text()
    except OSError as error:
        reason = escape(f"cannot read {path}: {error.strerror}")
        errors.print(f"[red]error:[/] {reason}")
        raise typer.Exit(EXIT_INVALID_SPEC) from None
    try:
        return load_job_file(text)
    except InvalidSpec as error:
        errors.print(f"[red]invalid ULMFiTJob[/] {escape(str(path))}:")
        _print_problems(error)
        raise typer.Exit(EXIT_INVALID_SPEC) from None


def _print_problems(error: InvalidSpec) -> None:
    for field, value, message in error.problems:
        line = f"  {field or '(document)'}: {message} (got {value!r})"
        errors.print(line, highlight=False, markup=False, soft_wrap=True)


@app.command()
def run(
    job_file: JobFile,
    workdir: Annotated[
        Path | None,
        typer.Option(help="Where the store, logs and result.json go. Default: runs/<job name>."),
    ] = None,
    nproc: Annotated[int, typer.Option(min=1, help="Training processes per stage.")] = 2,
) -> None:
    """Run every stage of the job on this machine; a rerun resumes where the last one stopped.

    Exits 2 when the data does not fit the job (checked before any stage) or a stage finds its
    input invalid, 1 when a stage fails otherwise, 130 when interrupted."""
    from ulmfit_operator.local import Interrupted, LocalRunner, StageFailed, result_table

    job = _load(job_file)
    workdir = workdir or Path("runs") / job.metadata.name
    try:
        runner = LocalRunner(job, workdir, nproc=nproc, console=console)
        result = runner.run()
    except InvalidSpec as error:  # the preflight: the data does not fit the spec
        errors.print(f"[red]✗ the data does not fit {escape(str(job_file))}[/] (no stage ran):")
        _print_problems(error)
        raise typer.Exit(EXIT_INVALID_SPEC) from None
    except StageFailed as failure:
        errors.print(f"[red]✗ {escape(str(failure))}[/]", highlight=False, soft_wrap=True)
        if failure.error is None:  # no error line from the trainer: the end of its log
            for line in failure.tail:
                errors.print(f"  {line}", highlight=False, markup=False)
        errors.print(f"  log: {failure.log_path}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_INVALID_SPEC if failure.invalid else EXIT_FAILED) from None
    except Interrupted as stop:
        errors.print(f"[yellow]{escape(str(stop))}[/]")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except UlmfitError as error:
        errors.print(f"[red]error:[/] {escape(str(error))}")
        raise typer.Exit(EXIT_FAILED) from None
    console.print(result_table(result))
    test = result.test
    if "accuracy" in test:
        baseline = result.majority_baseline
        console.print(
            f"test accuracy [bold]{test['accuracy']:.3f}[/]"
            + (f" (majority baseline {baseline:.3f})" if baseline is not None else "")
            + (f", macro-F1 {test['macroF1']:.3f}" if "macroF1" in test else "")
        )
    console.print(
        f"model: {result.model}\nresult: {Path(result.workdir) / 'result.json'}", markup=False
    )


@app.command()
def validate(job_file: JobFile) -> None:
    """Check a ULMFiTJob file and print it with every default filled in."""
    job = _load(job_file)
    console.print_json(json.dumps(job.to_wire()))


@app.command()
def plan(job_file: JobFile) -> None:
    """Show the stages the job will run, in order, what each starts from and waits for."""
    from ulmfit_operator.plan import make_plan

    job = _load(job_file)
    planned = make_plan(job, store_root="<store>")
    width = max(len(name) for name in planned.names)
    for index, stage in enumerate(planned.stages, 1):
        origin = stage.init_from or job.spec.model.pretrained or "random initialization"
        where = "distributed" if stage.distributed else "single process"
        after = f", after {', '.join(stage.depends_on)}" if stage.depends_on else ""
        console.print(
            f"{index}. {stage.name:<{width}} starts from {origin}  ({where}{after})",
            highlight=False,
        )


@app.command()
def reference() -> None:
    """Print the ULMFiTJob field reference (Markdown), generated from the API models."""
    from ulmfit_operator.reference import render_reference

    sys.stdout.write(render_reference())


@app.command()
def crd() -> None:
    """Print the ULMFiTJob CustomResourceDefinition (YAML), rendered from the API models."""
    from ulmfit_operator.crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())


@app.command("training-runtime")
def training_runtime_command() -> None:
    """Print the ClusterTrainingRuntime TrainJobs run on (YAML; Kubeflow Trainer v2): apply it
    where Trainer is installed, as the chart does."""
    import yaml

    from ulmfit_operator.children import DEFAULT_TRAINING_RUNTIME, training_runtime

    header = (
        "# Generated from operator/ulmfit_operator/children/trainjob.py; do not edit. "
        "Regenerate: make generate\n"
        "# Apply where Kubeflow Trainer v2 is installed: kubectl apply --server-side -f FILE\n"
    )
    body = yaml.safe_dump(
        training_runtime(DEFAULT_TRAINING_RUNTIME), sort_keys=False, default_flow_style=False
    )
    sys.stdout.write(header + "---\n" + body)


def start_operator(settings: OperatorSettings) -> None:
    """Run the controller (kopf and the Kubernetes client load only here)."""
    from ulmfit_operator.handlers import run_operator

    run_operator(settings)


# `python -m ulmfit_operator` is this same command: its options are the settings' fields.
app.command("operator")(operator_command(start_operator))


def predict_command(
    model: str,
    texts: list[str],
    *,
    file: Path | None = None,
    explain: bool = False,
    top_k: int = 5,
    labels: str | None = None,
    verbalizers: list[str] | None = None,
    prompt: str | None = None,
    tokenizer: Path | None = None,
    s3_endpoint: str | None = None,
    highlight: str = "auto",
) -> list[str]:
    """The trainer's command line for `ulmfit predict` (torch lives in the trainer process)."""
    command = [sys.executable, "-m", "ulmfit_trainer", "predict", model, *texts]
    command += ["--top-k", str(top_k), "--highlight", highlight]
    if file is not None:
        command += ["--file", str(file)]
    if explain:
        command.append("--explain")
    if labels:
        command += ["--labels", labels]
    for verbalizer in verbalizers or []:
        command += ["--verbalizer", verbalizer]
    if prompt is not None:
        command += ["--prompt", prompt]
    if tokenizer is not None:
        command += ["--tokenizer", str(tokenizer)]
    if s3_endpoint:
        command += ["--s3-endpoint", s3_endpoint]
    return command


@app.command()
def predict(
    model: Annotated[
        str, typer.Argument(help="Exported model: <run>/model/ directory or an s3:// URI.")
    ],
    texts: Annotated[
        list[str] | None,
        typer.Argument(help="Texts to classify; '-' or none reads stdin, one per line."),
    ] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Read texts from FILE, one per line.")
    ] = None,
    explain: Annotated[
        bool, typer.Option(help="Add the attention head's top tokens (highlighted on a terminal).")
    ] = False,
    top_k: Annotated[int, typer.Option(min=1, help="Tokens per explanation.")] = 5,
    labels: Annotated[
        str | None,
        typer.Option(help="Zero-shot with a bare causal LM directory: comma-separated labels."),
    ] = None,
    verbalizer: Annotated[
        list[str] | None,
        typer.Option(help="Zero-shot: LABEL=TEXT, the words that stand for LABEL (repeatable)."),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Zero-shot: text between the document and a label.")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer directory (default: the model's or the run's).")
    ] = None,
    s3_endpoint: Annotated[
        str | None,
        typer.Option(
            envvar="AWS_ENDPOINT_URL",
            help="S3 endpoint for an s3:// model; credentials from AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY.",
        ),
    ] = None,
) -> None:
    """Classify texts with an exported model: one JSON line per text on stdout (label,
    probabilities and, with --explain, the top tokens)."""
    import subprocess

    highlight = "always" if explain and errors.is_terminal else "never"
    command = predict_command(
        model, list(texts or []), file=file, explain=explain, top_k=top_k, labels=labels,
        verbalizers=verbalizer, prompt=prompt, tokenizer=tokenizer, s3_endpoint=s3_endpoint,
        highlight=highlight,
    )  # fmt: skip
    reads_stdin = (not texts and file is None) or "-" in (texts or [])
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE if reads_stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    if reads_stdin:
        assert process.stdin is not None
        # Pass stdin on (sys.stdin may not be a real file, e.g. under a test runner).
        for line in sys.stdin:
            process.stdin.write(line)
        process.stdin.close()
    assert process.stdout is not None
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
    code = process.wait()
    if code:
        raise typer.Exit(code)


# The cluster verbs (get, describe, logs, dashboard, suspend, resume); also `kubectl ulmfit`.
register_terminal_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
