"""The refresh command's own start-up: it steps aside for the stream on shared cores."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os
from services.refresh.cli import lower_priority
lower_priority(int(os.environ["WANT"]))
first = os.nice(0)
lower_priority(2)  # never raised back, never lowered twice
print(first, os.nice(0))
"""


def niceness_after(want: int) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={"WANT": str(want),
                         "PYTHONPATH": "."}, capture_output=True, text=True, check=True)
    first, second = out.stdout.split()
    return int(first), int(second)


def test_refresh_takes_its_niceness_once():
    base = subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"],
                          capture_output=True, text=True, check=True)
    start = int(base.stdout)
    assert niceness_after(10) == (max(start, 10), max(start, 10))
    assert niceness_after(0) == (start, max(start, 2))
