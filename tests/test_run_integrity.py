"""Run-directory integrity of ``fastdiff train``: one run per folder (flock), no silent restart over unusable
checkpoints (every skipped one logged, with the reason), orphan temporaries and weights removed at start-up,
stats.jsonl without duplicate records after a resume, and clear errors when a resume does not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from _standin import StandinLoss, tiny
from fastdiff._atomic import atomic_write, is_orphan_temp, remove_orphan_temps
from fastdiff.data import open_dataset
from fastdiff.training import TrainConfig, training_loop
from fastdiff.training.training_state import CheckpointError, find_checkpoints
from fastdiff.training.rundir import LOCK_NAME, RunDirectoryBusy, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = "builtin:shapes?n=48&seed=2"


def _cfg(**kw):
    base = dict(batch=16, duration=64, status=32, snapshot=-1, checkpoint=32, lr=0.01, lr_decay=0, rampup_mimg=0,
                seed=1, workers=0, progress=False, ema_stds=())
    base.update(kw)
    return TrainConfig(**base)


def _train(outdir, net=None, **kw):
    net = net or tiny()["net"]
    ds = open_dataset(DATA, resolution=net.img_resolution, channels=net.img_channels)
    return training_loop(net, StandinLoss(), ds, str(outdir), _cfg(**kw))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 64-image run with checkpoints at 32 and 64 (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("run")
    _train(out)
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------- lock


def test_a_second_run_on_a_locked_folder_is_refused_naming_folder_and_holder(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.held
        with pytest.raises(RunDirectoryBusy) as e:
            _train(tmp_path)
        msg = str(e.value)
        assert str(tmp_path) in msg and f"pid {os.getpid()}" in msg
        assert not find_checkpoints(tmp_path)  # it wrote nothing
    # Released on exit (the run's own lock too): training now runs, twice in a row.
    assert _train(tmp_path)["nimg"] == 64
    assert _train(tmp_path, duration=96)["resumed_from"] is not None


def test_the_lock_of_a_killed_process_is_not_stale(tmp_path):
    # rundir.py needs only the standard library: loaded by path, the child starts without importing torch.
    rundir = os.path.join(ROOT, "fastdiff", "training", "rundir.py")
    code = (f"import importlib.util, time; spec = importlib.util.spec_from_file_location('rundir', {rundir!r}); "
            f"m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"m.RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryBusy, match=f"pid {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    # SIGKILL: the kernel dropped the flock; the lock file is still there and is simply taken over.
    assert (tmp_path / LOCK_NAME).exists()
    lock = RunLock(tmp_path).acquire()
    lock.release()


def test_cli_second_run_exits_with_an_error(tmp_path, capsys):
    import argparse

    from fastdiff.cli import train as cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--preset", "_standin:tiny", "--data", DATA, "--outdir", str(tmp_path), "--duration",
                              "16", "--batch", "16", "--workers", "0", "--no-progress", "--device", "cpu"])
    with RunLock(tmp_path):
        assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "in use by another training run" in err and str(tmp_path) in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- checkpoints


def test_all_checkpoints_unusable_refuses_to_start_over_and_logs_each(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    (run / "training-state-0000000064.json").write_text('{"format": "fastdiff.tra')  # truncated JSON
    os.remove(run / "training-state-0000000032.safetensors")  # record without its weights
    before = {p: (run / p).read_bytes() for p in os.listdir(run) if p.startswith("training-state")}
    capsys.readouterr()
    with pytest.raises(CheckpointError, match="refusing to start over"):
        _train(run)
    err = capsys.readouterr().err
    assert "training-state-0000000064.json: the record is not valid JSON" in err
    assert "training-state-0000000032.safetensors is missing" in err
    assert {p: (run / p).read_bytes() for p in os.listdir(run) if p.startswith("training-state")} == before
    # Told to start over: it does, from 0, and the unusable records are gone.
    result = _train(run, resume=False)
    assert result["resumed_from"] is None and result["nimg"] == 64
    assert [n for n, _ in find_checkpoints(run)] == [64, 32]


def test_truncated_weights_are_skipped_with_a_message(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    w = run / "training-state-0000000064.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    capsys.readouterr()
    result = _train(run, duration=64)
    assert result["resumed_from"].endswith("training-state-0000000032.json")
    err = capsys.readouterr().err
    assert "skipping checkpoint" in err and "has 100 bytes" in err and "(truncated)" in err


# ------------------------------------------------------------------------------- orphans and stats.jsonl


def test_orphan_temporaries_and_weights_are_removed_at_start(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    # What a kill mid-write leaves: a temporary of the atomic writer, and weights whose JSON never came.
    killed = []

    def write_then_die(tmp):
        killed.append(tmp)
        open(tmp, "wb").write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(run / "training-state-0000000096.safetensors", write_then_die)
    assert not os.path.exists(killed[0])  # a clean failure removes its temporary ...
    orphan = run / os.path.basename(killed[0])
    orphan.write_bytes(b"partial")  # ... a SIGKILL does not: the same name stays behind
    assert is_orphan_temp(orphan.name)
    (run / "training-state-0000000128.safetensors").write_bytes(b"weights without a record")
    (run / "notes.tmp").write_text("the user's own file")
    (run / ".hidden.tmp").write_text("not ours either")
    capsys.readouterr()
    _train(run, duration=64)
    err = capsys.readouterr().err
    assert not orphan.exists() and not (run / "training-state-0000000128.safetensors").exists()
    assert (run / "notes.tmp").exists() and (run / ".hidden.tmp").exists()
    assert "a temporary file left by a killed run" in err and "whose record was never written" in err
    assert remove_orphan_temps(tmp_path / "missing") == []


def test_stats_records_past_the_resumed_checkpoint_are_dropped(trained, tmp_path, capsys):
    run = _copy(trained, tmp_path / "run")
    # The run got to 64 images in stats.jsonl, but its checkpoint at 64 is lost: the resumed run redoes 32..64.
    os.remove(run / "training-state-0000000064.json")
    with open(run / "stats.jsonl", "a") as f:
        f.write('{"nimg": 80, "lo')  # an append cut short by the kill
    capsys.readouterr()
    result = _train(run, duration=96)
    assert result["resumed_from"].endswith("training-state-0000000032.json")
    assert "dropped 2 record(s) past 32 images" in capsys.readouterr().err
    nimgs = [json.loads(line)["nimg"] for line in open(run / "stats.jsonl")]
    assert nimgs == [0, 32, 64, 96]


def test_starting_over_clears_the_stats(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    _train(run, duration=32, resume=False)
    assert [json.loads(line)["nimg"] for line in open(run / "stats.jsonl")] == [0, 32]
    assert [n for n, _ in find_checkpoints(run)] == [32]  # the old run's checkpoint at 64 is gone


# -------------------------------------------------------------------------------------- resume mismatches


def test_resume_with_another_network_or_conditioning_names_the_mismatch(trained, tmp_path):
    run = _copy(trained, tmp_path / "run")
    other = tiny(model_channels=12)["net"]
    with pytest.raises(ValueError) as e:
        _train(run, net=other, duration=96)
    msg = str(e.value)
    assert "training-state-0000000064.json" in msg and "model_channels: 8 vs 12" in msg
    assert "checkpoint vs this run" in msg
    with pytest.raises(ValueError, match="class-conditional run, this run is unconditional"):
        _train(run, net=tiny(label_dim=0)["net"], duration=96, cond=False)
    with pytest.raises(ValueError, match="unconditional"):
        _train(run, duration=96, cond=False)
    # Another training noise range (--sigma-range, recorded in the config's extra) is another run too.
    with pytest.raises(ValueError, match=r"trained on all noise levels, this run asks for sigma in \(0, 1\]"):
        _train(run, duration=96, extra={"sigma_range": "0,1"})
