"""`python -m ulmfit_operator`: the `ulmfit operator` command under another name.

Same options, defaults and ULMFIT_* environment fallbacks: both are made from
`OperatorSettings` by `settings.operator_command`.
"""

from __future__ import annotations

import typer

from ulmfit_operator.cli import start_operator
from ulmfit_operator.settings import operator_command

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(operator_command(start_operator))


def main(argv: list[str] | None = None) -> None:
    app(args=argv, prog_name="python -m ulmfit_operator")


if __name__ == "__main__":
    main()
