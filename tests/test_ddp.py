"""DistributedDataParallel on CPU: torchrun starts 2 gloo processes for a few steps; rank 0 alone writes
one consistent checkpoint, and both ranks end with identical weights (the checkpoint's)."""
from __future__ import annotations

import socket
import subprocess
import sys

import torch

from shared.records.checkpoint import LAST_NAME, load_checkpoint
from shared.records.runs import read_log
from tests.stage3_helpers import REPO, single_thread_env, write_edge_bar_idx

STEPS = 4
WORLD_SIZE = 2

# Each rank trains through shared.training.loop.train (the code train.py calls) and saves what it ended with.
WORKER = """
import os, sys, torch
from shared.training.config import TrainConfig
from shared.training.loop import train
data, out, dump, steps = sys.argv[1:5]
cfg = TrainConfig(dataset="mnist", data_dir=data, out=out, preset="tiny", timesteps=50, batch_size=8,
                  heldout_size=16, max_steps=int(steps), log_every=3, eval_every=2, ckpt_every=2,
                  sample_every=1000, sample_steps=2, class_cond=True, device="cpu", seed=3)
result = train(cfg)
rank = int(os.environ["RANK"])
torch.save({"model": result.model.state_dict(), "ema": result.ema.state_dict(),
            "step": result.progress.step, "run_dir": str(result.run_dir)}, os.path.join(dump, f"rank{rank}.pt"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_agree_and_rank0_writes_one_checkpoint(tmp_path):
    data = write_edge_bar_idx(tmp_path / "data", n=96)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out, dump = tmp_path / "runs", tmp_path / "dump"
    dump.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(worker),
           str(data), str(out), str(dump), str(STEPS)]
    proc = subprocess.run(cmd, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]

    runs = list(out.iterdir())
    assert len(runs) == 1  # rank 0 alone made a run directory
    run = runs[0]
    rank0, rank1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE))
    assert rank0["run_dir"] == str(run) and rank1["run_dir"] == "None"
    assert rank0["step"] == rank1["step"] == STEPS
    ckpt = load_checkpoint(run / LAST_NAME)
    assert ckpt["progress"]["step"] == STEPS and ckpt["options"]["world_size"] == WORLD_SIZE
    assert len(ckpt["rng"]) == WORLD_SIZE  # each rank's random streams, for an exact resume per rank
    assert not torch.equal(ckpt["rng"][0]["train_noise"], ckpt["rng"][1]["train_noise"])  # per-rank seeds
    for key, value in ckpt["model"].items():
        assert torch.equal(rank0["model"][key], value), key
        assert torch.equal(rank1["model"][key], value), key
    for key, value in rank0["ema"].items():
        assert torch.equal(rank1["ema"][key], value), key
    # rows at evaluations (2, 4) and at log_every (3): every rank joins the same collectives at each
    assert [int(r["step"]) for r in read_log(run / "log.csv")] == [2, 3, 4]
    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "ema.pt", "last.pt"]
    assert not list(run.glob(".*tmp*"))  # no half-written files left behind
