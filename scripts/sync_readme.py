"""Rewrite the generated ULMFiTJob reference inside README.md from the API models."""

from __future__ import annotations

from pathlib import Path

from ulmfit_operator.reference import END_MARKER, START_MARKER, render_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    text = README.read_text()
    head, rest = text.split(START_MARKER, 1)
    _, tail = rest.split(END_MARKER, 1)
    README.write_text(f"{head}{START_MARKER}\n{render_reference()}{END_MARKER}{tail}")


if __name__ == "__main__":
    main()
