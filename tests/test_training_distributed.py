"""Two gloo processes under torchrun on the CPU: DDP keeps the ranks identical, and the result equals
single-process training with the same global batch (with and without label dropout, whose masks must not
depend on the number of processes either)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from _standin import StandinLoss, tiny
from fastdiff.data import open_dataset
from fastdiff.training import TrainConfig, training_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.mark.parametrize("label_dropout", [0.0, 0.5])
def test_two_gloo_processes_match_single_process(tmp_path, label_dropout):
    from safetensors.torch import load_file

    outdir = tmp_path / "ddp"
    duration, batch = 64, 16
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "_standin.py"), str(outdir), str(duration), str(batch), "8", str(label_dropout)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = load_file(str(outdir / "rank0.safetensors")), load_file(str(outdir / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # identical weights on both ranks

    # One process, same global batch, same micro-batches (2 accumulation rounds of 8).
    made = tiny()
    ds = open_dataset("builtin:shapes?n=48&seed=2", resolution=8, channels=3)
    cfg = TrainConfig(batch=batch, batch_gpu=8, duration=duration, status=32, snapshot=32, checkpoint=0, lr=0.01,
                      lr_decay=0, rampup_mimg=0, seed=1, workers=0, progress=False,
                      label_dropout=label_dropout)
    training_loop(made["net"], StandinLoss(), ds, str(tmp_path / "single"), cfg)
    single = made["net"].state_dict()
    for k in r0:
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-5, msg=k)
    # Rank 0 wrote the snapshots; the EMAs agree too.
    a = load_file(str(outdir / "network-snapshot-0000000064-0.100.safetensors"))
    b = load_file(str(tmp_path / "single" / "network-snapshot-0000000064-0.100.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
