"""TensorFlow's C++ start-up messages (CUDA probing, oneDNN and CPU-feature notices), kept out of genderrec's output.

TensorFlow logs through absl, and whatever its shared libraries print while they load — before absl's logging is
set up — reaches stderr at every level, ignoring ``TF_CPP_MIN_LOG_LEVEL``. So :func:`install` sets that level
(3 unless the user set one) and applies it to the lines printed while ``tensorflow`` is imported too: that import
runs with stderr captured, and the lines below the level are dropped, everything else (Python tracebacks, other
libraries' output) is written back. ``GENDERREC_TF_LOGS=1`` turns all of this off. Called from
``genderrec/__init__.py``, so it holds in every process that imports genderrec, Ray workers included.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile

ENV_SWITCH = "GENDERREC_TF_LOGS"  # 1: TensorFlow's start-up messages as TensorFlow prints them
DEFAULT_LEVEL = "3"  # TensorFlow's own scale: 0 all, 1 no INFO, 2 no WARNING, 3 no ERROR
_LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} ")  # absl's prefix: severity letter, month and day
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def env_vars() -> dict[str, str]:
    """What a process needs in its environment for quiet start-up (e.g. Ray workers' ``runtime_env``)."""
    if os.environ.get(ENV_SWITCH) == "1":
        return {}
    return {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", DEFAULT_LEVEL)}


def install() -> None:
    """Set the level and filter the lines printed while ``tensorflow`` loads, unless asked not to."""
    os.environ.update(env_vars())
    waiting = any(isinstance(finder, _QuietImport) for finder in sys.meta_path)
    if os.environ.get(ENV_SWITCH) != "1" and "tensorflow" not in sys.modules and not waiting:
        sys.meta_path.insert(0, _QuietImport())


def kept(lines: list[str], level: int) -> list[str]:
    """The lines a reader should see at ``level``: absl lines below it go (and absl's banner with them)."""
    out = []
    for line in lines:
        match = _ABSL_LINE.match(line)
        if match and _LEVELS[match.group(1)] < level or level > 0 and line.rstrip("\n") == _BANNER:
            continue
        out.append(line)
    return out


@contextlib.contextmanager
def _filtered_stderr():
    """Capture file descriptor 2 (C++ writes there directly), then write back what :func:`kept` keeps."""
    level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") or 0)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", errors="replace")
            sys.stderr.write("".join(kept(text.splitlines(keepends=True), level)))
            sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of ``tensorflow`` inside :func:`_filtered_stderr`, then steps aside."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        with _filtered_stderr():
            self.loader.exec_module(module)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as Python would, with its loader wrapped in :class:`_QuietLoader` (once)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec
