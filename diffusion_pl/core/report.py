"""A Markdown report written line by line: appended to a file and echoed to a stream as each line comes, so a long
measurement shows its progress and keeps what it finished."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO


class MarkdownReport:
    """Lines of Markdown appended to ``path`` (emptied first) and written to ``echo``.

    Args:
        path: The report file.
        echo: Where each line is also written (a tool passes ``sys.stdout``).
    """

    def __init__(self, path: str | Path, echo: TextIO) -> None:
        self.path = Path(path)
        self.echo = echo
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def append(self, line: str) -> None:
        """Add one line."""
        self.echo.write(line + "\n")
        self.echo.flush()
        with self.path.open("a") as file:
            file.write(line + "\n")

    def extend(self, lines: list[str]) -> None:
        """Add lines in order."""
        for line in lines:
            self.append(line)
