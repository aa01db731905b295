"""Post-hoc EMA (EDM2): the stored EMA's profile against the EMA itself, exact rebuilds where the target is in
the snapshots' span (dense snapshots, the run's own decay), the summation-by-parts bound for sparse ones,
and scripts/posthoc_ema.py on a trained run (files that load like ema.pt, --fd picking a decay)."""
from __future__ import annotations

import json

import pytest
import torch

from shared import UserError
from shared.model.ema import make_ema
from shared.records.checkpoint import load_checkpoint, load_for_sampling
from shared.training.config import TrainConfig
from shared.training.loop import train
from shared.training.posthoc_ema import (combine, ema_profile, posthoc_ema, posthoc_name, reconstruction,
                                        snapshots, target_profile)
from tests.scripts import load_script
from tests.stage3_helpers import REPO, one_thread, write_edge_bar_idx  # noqa: F401 (fixture)
from tests.tiny_trained import draw


@pytest.mark.parametrize("decay, warmup", [(0.9, 0), (0.999, 10), (0.95, 3)])
def test_the_profile_is_what_the_ema_does(decay, warmup):
    """Weights θ_j = the j-th basis vector: after N updates the EMA's weights are its profile, entry by entry."""
    steps = 40
    net = torch.nn.Linear(steps, 1, bias=False).double()
    ema = make_ema(net, decay, warmup)
    with torch.no_grad():
        for j in range(steps):
            net.weight.zero_()
            net.weight[0, j] = 1.0
            ema.update_parameters(net)
    # (the EMA forms its decay in float32 on the device: agreement to float32 rounding)
    torch.testing.assert_close(ema.module.weight[0], ema_profile(steps, decay, warmup), rtol=1e-5, atol=1e-7)
    assert float(ema_profile(steps, decay, warmup).sum()) == pytest.approx(1.0, abs=1e-12)


def _trajectory(steps: int, dim: int = 5) -> torch.Tensor:
    """Raw weights θ_1 … θ_N [N x dim]: a random walk (slowly changing, like training's)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(steps, dim, generator=gen, dtype=torch.float64).cumsum(0) * 0.1


def _stored(theta: torch.Tensor, steps: list[int], decay: float, warmup: int) -> list[dict]:
    return [{"w": ema_profile(s, decay, warmup) @ theta[:s]} for s in steps]


@pytest.mark.parametrize("decay, warmup", [(0.95, None), (0.8, None), (0.9, 5)])
def test_dense_snapshots_rebuild_any_target_exactly(decay, warmup):
    theta, n = _trajectory(60), 60
    steps = list(range(1, n + 1))  # a snapshot after every step: their profiles span every profile
    target = target_profile(n, decay, warmup)
    fit = reconstruction(steps, 0.999, 10, target)
    assert fit.residual < 1e-8 and fit.cdf_gap < 1e-8 and sum(fit.coefficients) == pytest.approx(1.0, abs=1e-10)
    rebuilt = combine(_stored(theta, steps, 0.999, 10), fit.coefficients)["w"]
    torch.testing.assert_close(rebuilt, target @ theta, rtol=1e-7, atol=1e-7)


def test_the_runs_own_decay_is_its_last_snapshot():
    fit = reconstruction([100, 200, 300], 0.99, 10, ema_profile(300, 0.99, 10))
    assert fit.residual < 1e-10
    torch.testing.assert_close(torch.tensor(fit.coefficients), torch.tensor([0.0, 0.0, 1.0]), rtol=0, atol=1e-8)


@pytest.mark.parametrize("decay", [0.98, 0.99, 0.995, 0.999])
def test_sparse_snapshots_are_within_the_cumulative_gap_bound(decay):
    """‖rebuilt − target‖ ≤ max_j |Σ_{i≤j} r(i)| · Σ_j ‖θ_{j+1} − θ_j‖ (summation by parts)."""
    n, steps = 1600, [200, 400, 600, 800, 1000, 1200, 1400, 1600]
    theta = _trajectory(n)
    target = target_profile(n, decay, None)
    fit = reconstruction(steps, 0.999, 10, target)
    rebuilt = combine(_stored(theta, steps, 0.999, 10), fit.coefficients)["w"]
    error = float((rebuilt - target @ theta).norm())
    path_length = float((theta[1:] - theta[:-1]).norm(dim=1).sum())
    assert error <= fit.cdf_gap * path_length + 1e-9
    assert 0 < fit.cdf_gap < 0.25


def test_targets_are_averages_and_bad_ones_are_refused():
    for decay, warmup in ((0.99, None), (0.5, None), (0.999, 10)):
        assert float(target_profile(500, decay, warmup).sum()) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(UserError, match=r"\(0, 1\)"):
        target_profile(10, 1.0, None)
    with pytest.raises(UserError, match="distinct snapshot steps"):
        reconstruction([5, 5, 10], 0.99, 10, target_profile(10, 0.9, None))
    assert posthoc_name(0.995) == "ema-posthoc-0.995.pt" and posthoc_name(0.99, 10) == "ema-posthoc-0.99-w10.pt"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    data = write_edge_bar_idx(tmp_path_factory.mktemp("edge-bars"), n=256)
    cfg = TrainConfig(dataset="mnist", data_dir=str(data), preset="tiny", timesteps=50, batch_size=8, heldout_size=8,
                      judge_heldout=0, log_every=4, eval_every=10_000, sample_every=10_000, sample_steps=2,
                      device="cpu", precision="fp32", out=str(tmp_path_factory.mktemp("runs")), seed=5, ckpt_every=4,
                      keep_snapshots=4, max_steps=16, ema_decay=0.9, ema_warmup=2)
    return train(cfg).run_dir, data


def test_the_rebuilt_file_loads_like_ema_pt_and_its_weights_are_the_combination(trained_run):
    run, _ = trained_run
    loaded = snapshots(run)
    assert [step for step, _ in loaded] == [4, 8, 12, 16]
    file, fit = posthoc_ema(loaded, 0.9, warmup=2)  # the run's own EMA: ema.pt itself
    stored = load_checkpoint(run / "ema.pt")["state_dict"]
    for name, value in stored.items():
        torch.testing.assert_close(file["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    other, fit = posthoc_ema(loaded, 0.7)
    expected = combine([c["state_dict"] for _, c in loaded], fit.coefficients)
    assert all(torch.equal(other["state_dict"][k], expected[k]) for k in expected)
    assert other["meta"]["posthoc_ema"]["snapshot_steps"] == [4, 8, 12, 16] and other["meta"]["step"] == 16


def test_the_script_writes_the_files_and_picks_a_decay_by_fd(trained_run, tmp_path, capsys):
    run, data = trained_run
    script = load_script(REPO / "scripts" / "posthoc_ema.py")
    report = script.main([str(run), "--decays", "0.5,0.8", "--fd", "--data-dir", str(data), "--heldout", "64",
                          "--classifier", str(tmp_path / "clf.pt"), "--per-class", "4", "--steps", "3",
                          "--device", "cpu", "--no-progress"])
    for decay in ("0.5", "0.8"):
        model, schedule, meta = load_for_sampling(run / f"ema-posthoc-{decay}.pt")
        assert meta["posthoc_ema"]["decay"] == float(decay)
        assert torch.isfinite(draw(model, schedule, [0, 1], labels=[0, 3], sampler="ddim", num_steps=3)).all()
    names = [row["name"] for row in report["runs"]]
    assert names == ["decay 0.5", "decay 0.8", "stored ema.pt"] and report["best"] in names[:2]
    assert json.loads((run / "posthoc.json").read_text())["best"] == report["best"]
    assert "lowest FD" in capsys.readouterr().out


def test_a_run_without_snapshots_is_one_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="--keep-snapshots"):
        snapshots(tmp_path / "run")
