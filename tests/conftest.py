"""Shared test configuration.

The repository root goes first on ``sys.path`` so that ``tests`` is importable
as a package, whatever pytest's import mode: the harness's fork server starts
with the parent's ``sys.path`` and its workers import their targets
(``tests.integration...``) by name.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
