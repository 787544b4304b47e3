"""Root pytest configuration, for the tests and the doctests alike: a headless matplotlib backend in this
process only (notebook kernels keep theirs), and a throw-away weights cache so no run touches ~/.cache."""
from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("Agg")

if "KD_WORKBENCH_CACHE" not in os.environ:
    os.environ["KD_WORKBENCH_CACHE"] = tempfile.mkdtemp(prefix="kd-workbench-test-cache-")
