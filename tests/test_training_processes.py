"""Training in other processes: resume after ``kill -9``, and two DDP replicas under ``torchrun`` (gloo)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_cache, make_plans

from dscovid.results.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

FOLD_DIR = Path("res") / "Dataset900_Tiny" / "DeepSCCOVIDTrainer__3d_cpu" / "fold_0"


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _command(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dscovid.cli.train", "0", "--preprocessed", str(tmp_path / "pre"),
            "--results", str(tmp_path / "res"), "--device", "cpu", "--no-validation", *extra]


def _alive_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_kill_minus_nine_then_continue_finishes_at_the_right_epoch(tmp_path):
    make_cache(tmp_path / "pre", n_cases=12, plans=make_plans("Dataset900_Tiny", epochs=(3, 3), iterations=6))
    latest = tmp_path / FOLD_DIR / "checkpoint_latest.pt"
    process = subprocess.Popen(_command(tmp_path, "--workers", "1"), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    killed_at = load_checkpoint(latest)["epoch"]
    assert 1 <= killed_at < 6
    assert not (tmp_path / FOLD_DIR / "checkpoint_final.pt").exists()
    # the data-loading worker followed its parent (no orphan left spinning)
    deadline = time.monotonic() + 10
    while _alive_with(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive_with(str(tmp_path))

    done = subprocess.run(_command(tmp_path, "--workers", "1", "--continue"), env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    final = load_checkpoint(tmp_path / FOLD_DIR / "checkpoint_final.pt")
    assert final["epoch"] == 6 and final["stage"] == 1
    assert final["history"]["epoch"] == [float(e) for e in range(6)]  # resumed: no epoch repeated or skipped


def test_two_ddp_processes_keep_identical_replicas(tmp_path):
    make_cache(tmp_path / "pre", n_cases=12, plans=make_plans("Dataset900_Tiny", epochs=(1, 1), iterations=3))
    with socket.socket() as probe:  # torchrun's static rendezvous needs a concrete free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    command = torchrun + _command(tmp_path, "--workers", "0")[1:]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    # The trainer compares the replicas' weights at the end and fails the run when they differ.
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    final = load_checkpoint(tmp_path / FOLD_DIR / "checkpoint_final.pt")
    assert final["epoch"] == 2  # both stages ran: the routed stage-1 step and the DDP joint step
    torch.manual_seed(12345)
    from dscovid.model import build_network
    from dscovid.plans.configuration import Configuration

    initial = build_network(Configuration.from_dict("3d_cpu", final["configuration"])).state_dict()
    assert any(not torch.equal(initial[k], final["network_weights"][k]) for k in initial)


def test_pipeline_from_raw_synthetic_through_training_to_fold_validation(tmp_path, monkeypatch):
    """dscovid_make_synthetic -> dscovid_plan_and_preprocess -> dscovid_train (both stages) -> validation/summary.json."""
    from dscovid.cli.make_synthetic import main as make_synthetic
    from dscovid.cli.plan_and_preprocess import main as plan_and_preprocess
    from dscovid.cli.train import main as train

    for name in ("raw", "preprocessed", "results"):
        monkeypatch.setenv(f"DSCOVID_{name}", str(tmp_path / name))
    assert make_synthetic(["-o", str(tmp_path / "raw" / "Dataset951_Synth"), "-n", "10", "--seed", "1", "-q"]) == 0
    assert plan_and_preprocess(["-d", "951", "-c", "3d_cpu", "-np", "1", "-q"]) == 0
    assert train(["3", "--epochs", "1", "--iterations", "2", "--device", "cpu", "--workers", "1", "-q"]) == 0

    fold_dir = tmp_path / "results" / "Dataset951_Synth" / "DeepSCCOVIDTrainer__3d_cpu" / "fold_3"
    state = load_checkpoint(fold_dir / "checkpoint_final.pt")
    assert state["epoch"] == 2 and state["configuration_name"] == "3d_cpu"
    import json

    splits = json.loads((tmp_path / "preprocessed" / "Dataset951_Synth" / "splits_final.json").read_text(encoding="utf-8"))
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text(encoding="utf-8"))
    predicted = json.loads((fold_dir / "validation" / "predictions.json").read_text(encoding="utf-8"))
    assert sorted(c["case"] for c in predicted["cases"]) == sorted(splits[3]["val"])
    assert summary["classification"] is not None and "segmentation" in summary
