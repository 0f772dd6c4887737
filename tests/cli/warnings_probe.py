"""Run the ``streamtune`` CLI with every warning shown and say which ones streamtune's own calls caused.

``python -W default tests/cli/warnings_probe.py train CONFIG`` behaves like ``streamtune train CONFIG``;
each warning is printed as usual, and one caused by streamtune (a frame of the streamtune package calls
the code that warns, or imports the module that warns) is printed again on a line starting with
``STREAMTUNE_CAUSED``. Warnings raised while a third-party library imports another are not ours.
"""

from __future__ import annotations

import runpy
import sys
import traceback
import warnings
from pathlib import Path

MARKER = "STREAMTUNE_CAUSED"


def package_dir() -> str:
    import streamtune

    return str(Path(streamtune.__file__).resolve().parent)


def _is_import_machinery(filename: str) -> bool:
    return "importlib._bootstrap" in filename


def caused_by(frames: list, package: str) -> bool:
    """Whether the innermost frame of ``package`` (outward from the warning) made the call that warns.

    Args:
        frames: ``traceback.extract_stack()`` at the warning, outermost first, warning machinery removed.
        package: directory of the package whose calls count.
    """
    for index in range(len(frames) - 1, -1, -1):
        filename = frames[index].filename
        if filename.startswith(package):
            return True
        if _is_import_machinery(filename):
            while index >= 0 and _is_import_machinery(frames[index].filename):
                index -= 1
            return index >= 0 and frames[index].filename.startswith(package)
    return False


def _show(message, category, filename, lineno, file=None, line=None):
    stream = sys.stderr if file is None else file
    stream.write(warnings.formatwarning(message, category, filename, lineno, line))
    frames = [f for f in traceback.extract_stack()[:-1]
              if not f.filename.endswith(("warnings.py", "warnings_probe.py"))]
    if caused_by(frames, package_dir()):
        stream.write(f"{MARKER} {category.__name__}: {message} ({filename}:{lineno})\n")


def main() -> None:
    warnings.showwarning = _show
    sys.argv = ["streamtune", *sys.argv[1:]]
    runpy.run_module("streamtune.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
