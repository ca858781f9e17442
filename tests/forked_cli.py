"""Run several ``python -m diffusion_pl`` commands as real processes while paying the imports once.

Started as a script (``python tests/forked_cli.py``) with a JSON list of argument lists on standard input: it imports
the command line once (Lightning alone takes ~4 s), then forks one child per argument list before any thread pool
exists. Each child is the command as a user runs it: its own stdout/stderr (file descriptors redirected to files), the
entry point ``main()`` reading ``sys.argv``, an uncaught exception printed as a traceback with exit status 1 as the
interpreter does, ``sys.exit``'s status otherwise. Prints one JSON list of ``{returncode, stdout, stderr}``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from diffusion_pl.cli import main


def run_child(args: list[str], out: Path, err: Path) -> int:
    """Fork, run ``diffusion-pl ARGS`` in the child with its output in ``out``/``err``; the child's exit status."""
    pid = os.fork()
    if pid == 0:  # the child never returns
        code = 1
        try:
            for fd, path in ((1, out), (2, err)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ["diffusion-pl", *args]
            main()
            code = 0
        except SystemExit as exit_:  # sys.exit("text") prints the text and exits 1, as the interpreter does
            if isinstance(exit_.code, str):
                sys.stderr.write(exit_.code + "\n")
            code = 1 if isinstance(exit_.code, str) else exit_.code or 0
        except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def run_all(commands: list[list[str]]) -> list[dict[str, object]]:
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for i, args in enumerate(commands):
            out, err = Path(folder) / f"{i}.out", Path(folder) / f"{i}.err"
            code = run_child(args, out, err)
            results.append({"returncode": code, "stdout": out.read_text(errors="replace"),
                            "stderr": err.read_text(errors="replace")})
    return results


if __name__ == "__main__":
    json.dump(run_all(json.load(sys.stdin)), sys.stdout)
