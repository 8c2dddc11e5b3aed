"""Code of an earlier commit, read from git history, for benches that time "before" and "now" in one process."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def old_module(commit: str, path: str, name: str) -> types.ModuleType:
    """``path`` (a file of this repository) as it was at ``commit``, executed as module ``name``. Needs a clone
    with that history (not a shallow one)."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    return module
