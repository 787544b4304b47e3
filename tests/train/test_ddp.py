"""fit under torchrun: 2 Gloo processes on the CPU match one process on the same global batches.

Tolerance: the two runs see the same samples per global batch (DistributedSampler order, each rank
taking every other position), use MLPs without BatchNorm and per-sample-mean terms, so the averaged
losses and DDP's averaged gradients equal one process's up to float32 summation order (the mean over
32 samples is computed as two means over 16, then averaged). Measured: losses agree to ~5e-7
absolute (relative ~1e-6 on the total, ~1e-5 on the small kd values), weights to ~3e-8, CKA to ~2e-8
after 8 AdamW steps; we allow 1e-5 absolute / 1e-4 relative.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402


@pytest.fixture(scope="module")
def single_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return ddp_worker.run()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the Gloo backend")
def test_two_gloo_ranks_match_one_process(single_process, tmp_path):
    command = [str(TORCHRUN) if TORCHRUN.exists() else shutil.which("torchrun") or "torchrun",
               "--nproc_per_node=2", "--standalone", str(HERE / "ddp_worker.py"), str(tmp_path / "ddp.json")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment)
    assert finished.returncode == 0, finished.stderr[-4000:]
    distributed = json.loads((tmp_path / "ddp.json").read_text())
    assert distributed["world_size"] == 2 and single_process["world_size"] == 1

    expected, found = single_process["history"], distributed["history"]
    assert found["step"] == expected["step"] == list(range(1, ddp_worker.STEPS_PER_EPOCH + 1))
    assert expected["samples"] == [32.0] * 8 and found["samples"] == [16.0] * 8, "each rank takes half of each batch"
    for column in ("loss", "ce", "kd", "hint", "lr"):
        np.testing.assert_allclose(found[column], expected[column], rtol=1e-4, atol=1e-5, err_msg=column)
    for key, value in single_process["student"].items():
        np.testing.assert_allclose(distributed["student"][key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    assert distributed["cka_steps"] == single_process["cka_steps"] == [0, 4, 8]
    np.testing.assert_allclose(distributed["cka"], single_process["cka"], rtol=1e-4, atol=1e-5)
    assert np.ptp(np.asarray(expected["loss"])) > 1e-3, "the run must actually train for the comparison to mean much"
