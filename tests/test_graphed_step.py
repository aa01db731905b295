"""The CUDA-graph training step (shared/training/graphed.py): its counter draws against their
distributions, its uncaptured body against an explicit L_simple and against the plain step, no host
sync, exact resume through the trainer, the learning-rate tensor the graph reads, the option's
resolution; on CUDA, the replayed graph against the uncaptured step, bit for bit, without a host sync."""
from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import asdict, replace

import pytest
import torch
from scipy import stats
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from shared.diffusion.schedule import NoiseSchedule
from shared.errors import UserError
from shared.model.ema import make_ema
from shared.model.unet import UNet
from shared.records.runs import read_log
from shared.training import loop
from shared.training.config import TrainConfig, merge_resume_options, resolve_cuda_graphs
from shared.training.graphed import CounterDraws, GraphedStep, normal_cdf
from shared.training.loop import GradientStep, lr_factor, train
from shared.training.loss import l_simple
from shared.training.state import TrainState
from tests.stage3_helpers import NUM_CLASSES, SIZE, edge_bar_dataset, one_thread  # noqa: F401 (autouse fixture)
from tests.test_training_hot_loop import HostSyncCounter

T = 50
NULL = NUM_CLASSES


def _draws(rows=8, k=1, device="cpu", seed=3, shape=(1, SIZE, SIZE)):
    return CounterDraws(seed, rows, shape, T, k, torch.device(device))


def test_counter_draws_follow_their_distributions():
    """t uniform on {0, …, T−1} (χ²), the label drop a Bernoulli(p) (binomial test), ε standard normal (KS)."""
    rows = 8192
    draws = _draws(rows=rows, shape=(1, 4, 4))
    y, t, eps = draws.draw(0, torch.zeros(rows, dtype=torch.long), NULL, 0.1)
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= T - 1
    assert stats.chisquare(torch.bincount(t, minlength=T).numpy()).pvalue > 1e-3
    dropped = int((y == NULL).sum())
    assert stats.binomtest(dropped, rows, 0.1).pvalue > 1e-3
    assert eps.shape == (rows, 1, 4, 4) and eps.dtype == torch.float32
    assert stats.kstest(eps.flatten().double().numpy(), "norm").pvalue > 1e-3
    # Φ against the closed form at a few points
    z = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0], dtype=torch.float64)
    assert torch.allclose(normal_cdf(z), torch.tensor(stats.norm.cdf(z.numpy())), atol=1e-15)


def test_counter_draws_depend_on_row_step_and_micro_batch_only():
    small, large = _draws(rows=4, k=2), _draws(rows=16, k=2)
    labels = torch.arange(16) % NUM_CLASSES
    for micro in (0, 1):
        a, b = small.draw(micro, labels[:4], NULL, 0.5), large.draw(micro, labels, NULL, 0.5)
        for x, y in zip(a, b):
            assert torch.equal(x, y[:4])  # row i's draws do not depend on the batch they are drawn in
    first = small.draw(0, labels[:4], NULL, 0.5)
    assert not torch.equal(first[2], small.draw(1, labels[:4], NULL, 0.5)[2])  # micro-batches differ
    small.advance()
    later = small.draw(0, labels[:4], NULL, 0.5)
    assert not torch.equal(first[2], later[2])  # steps differ
    small.start_at(0)
    assert all(torch.equal(x, y) for x, y in zip(first, small.draw(0, labels[:4], NULL, 0.5)))
    other_seed = _draws(rows=4, k=2, seed=4).draw(0, labels[:4], NULL, 0.5)
    assert not torch.equal(first[2], other_seed[2])


def _state(seed=0):
    torch.manual_seed(seed)
    model = UNet.from_preset("tiny", image_size=SIZE, num_classes=NUM_CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2), fused=True, capturable=False)
    for group in optimizer.param_groups:
        group["initial_lr"] = 1e-2
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return TrainState(model, make_ema(model, 0.9, 0), optimizer, sched, torch.amp.GradScaler("cpu", enabled=False),
                      torch.Generator().manual_seed(seed), torch.Generator(), torch.device("cpu"))


def _batches(n_steps, rows=8):
    data = edge_bar_dataset(rows * n_steps, seed=1)
    x0 = data.images.float() / 127.5 - 1
    return [[(x0[i * rows:(i + 1) * rows], data.labels[i * rows:(i + 1) * rows])] for i in range(n_steps)]


def _gradient_step(state, draws):
    return GradientStep(state, state.model, NoiseSchedule("linear", T), nullcontext(), max_grad_norm=1.0,
                        p_uncond=0.25, min_snr_gamma=2.0, draws=draws)


def test_uncaptured_graph_step_is_l_simple_on_its_draws_and_matches_the_plain_step():
    """The first step's loss is the min-SNR-weighted L_simple of the draws' (y, t, ε), computed here
    from l_simple itself; three steps with new batches copied into the static buffers leave the same
    weights, EMA and counters as the GradientStep called on the batches directly."""
    batches = _batches(3)
    a, b = _state(), _state()
    graphed = GraphedStep(_gradient_step(a, _draws()), capture=False)
    direct = _gradient_step(b, _draws())
    x0, y = batches[0][0]
    y_drop, t, eps = _draws().draw(0, y, NULL, 0.25)
    schedule = NoiseSchedule("linear", T)
    with torch.no_grad():
        weights = torch.minimum(torch.ones(8, dtype=torch.float64), 2.0 / schedule.log_snr[t].exp()).float()
        expected = (l_simple(a.model, schedule, x0, y_drop, t, eps) * weights).mean()
    for i, batch in enumerate(batches):
        loss, _, skip = graphed(batch)
        if i == 0:
            torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        direct(batch)
        assert not bool(skip)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(a.ema.parameters(), b.ema.parameters()):
        assert torch.equal(p, q)
    assert int(a.ema.n_averaged) == 3 and int(graphed.step.draws.step) == 3


def test_graph_step_body_makes_no_host_sync():
    state = _state()
    step = GraphedStep(_gradient_step(state, _draws()), capture=False)
    batches = _batches(4)
    step(batches[0])
    with HostSyncCounter() as counter:
        for batch in batches[1:]:
            step(batch)
            state.lr_scheduler.step()
            step.sync_lr()
    assert counter.seen == []


class HostMemoryReads(TorchDispatchMode):
    """Records every op that takes a host (CPU) tensor of one or more dimensions into meta-device work: a
    copy from host memory, which on a GPU waits for the device and cannot be captured in a graph."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs or {}, out)) if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors) and any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.seen.append(str(func))
        return out


def _meta_step_work(schedule_device: str) -> list[str]:
    """The graphed step's work but the optimizer (fused AdamW has no meta kernel) on the meta device, where
    reading a value on the host raises: the draws, forward, loss, backward, clip, EMA and counters."""
    meta = torch.device("meta")
    model = UNet.from_preset("tiny", image_size=SIZE, num_classes=NUM_CLASSES).to(meta)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = TrainState(model, make_ema(model, 0.9, 0), optimizer, sched, torch.amp.GradScaler("cpu", enabled=False),
                       torch.Generator(), torch.Generator(), meta)
    draws = _draws(device="meta")
    step = GradientStep(state, model, NoiseSchedule("linear", T).to(schedule_device), nullcontext(), max_grad_norm=1.0,
                        p_uncond=0.25, min_snr_gamma=2.0, draws=draws)
    x0, y = torch.zeros(8, 1, SIZE, SIZE, device=meta), torch.zeros(8, dtype=torch.long, device=meta)
    with HostMemoryReads() as reads:
        loss = step.backward([(x0, y)])
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        skip = ~(torch.isfinite(loss) & torch.isfinite(norm))
        state.ema.update_parameters(model, skip=skip)
        state.count_step(skip)
        draws.advance()
    return reads.seen


def test_graph_step_work_reads_no_host_memory():
    """On the meta device the step's work runs without one copy from host memory (and without a host read,
    which raises there); the same work with the schedule left on the CPU is caught copying it."""
    assert _meta_step_work("meta") == []
    assert _meta_step_work("cpu") and set(_meta_step_work("cpu")) == {"aten._to_copy.default"}


def test_sync_lr_keeps_the_tensor_the_graph_reads():
    """Whether the scheduler fills the tensor or writes a float into the group, the group ends up holding
    the same tensor object, holding the scheduled value."""
    state = _state()
    step = GraphedStep(_gradient_step(state, _draws()), capture=False)
    step(_batches(1)[0])  # (the scheduler expects an optimizer step first)
    tensor = state.optimizer.param_groups[0]["lr"]
    state.optimizer.param_groups[0]["lr"] = 0.004  # a scheduler that assigns floats
    step.sync_lr()
    assert state.optimizer.param_groups[0]["lr"] is tensor and float(tensor) == pytest.approx(0.004)
    state.lr_scheduler.step()
    step.sync_lr()
    assert state.optimizer.param_groups[0]["lr"] is tensor and float(tensor) == pytest.approx(0.005)


def _cfg(tmp_path, name, **kw):
    return TrainConfig(**{**dict(preset="tiny", timesteps=T, batch_size=8, heldout_size=16, log_every=1, eval_every=4,
                                 ckpt_every=4, sample_every=1000, sample_steps=2, device="cpu", precision="fp32",
                                 out=str(tmp_path / name), judge_heldout=0, class_cond=True, lr=1e-2, cosine=True,
                                 warmup_steps=2, seed=5), **kw})


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """The trainer's graphed path, uncaptured on the CPU (capture needs CUDA): what a CUDA run would draw."""
    monkeypatch.setattr(loop, "resolve_cuda_graphs", lambda cfg, precision, device, world_size: True)


def test_graphed_run_resumes_exactly_and_follows_its_lr_schedule(tmp_path, graphs_on_cpu):
    """8 steps straight against 4 steps and a resume for 4 more: the same EMA weights and logged losses
    (a constant LR after the warm-up, so both runs' schedules agree); with a cosine decay the logged LR is
    the schedule's and the checkpoint holds it as a float."""
    data = edge_bar_dataset(96)
    full = train(_cfg(tmp_path, "full", max_steps=8, cosine=False), data)
    part = train(_cfg(tmp_path, "part", max_steps=4, cosine=False), data)
    resumed = train(TrainConfig(resume=str(part.run_dir), max_steps=8, device="cpu", out=str(tmp_path / "part")),
                    data, given={"resume", "max_steps", "device", "out"})
    for p, q in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(p, q)
    full_rows = {int(r["step"]): r for r in read_log(full.run_dir / "log.csv")}
    resumed_rows = read_log(resumed.run_dir / "log.csv")
    assert [int(r["step"]) for r in resumed_rows] == list(range(1, 9))  # the first 4 carried over
    for row in resumed_rows:
        assert float(row["loss"]) == float(full_rows[int(row["step"])]["loss"])
    cosine = train(_cfg(tmp_path, "cosine", max_steps=8), data)
    for row in read_log(cosine.run_dir / "log.csv"):
        step = int(row["step"])
        assert float(row["lr"]) == pytest.approx(1e-2 * lr_factor(step - 1, 2, 8, True), rel=1e-12, abs=1e-15)
    options = json.loads((cosine.run_dir / "options.json").read_text())["options"]
    assert options["cuda_graphs_used"] is True
    saved = torch.load(cosine.run_dir / "last.pt", weights_only=True)
    assert isinstance(saved["optimizer"]["param_groups"][0]["lr"], float)


def test_resume_keeps_the_way_a_run_drew(tmp_path):
    """A run whose graphs resolved on (or off) resumes with them on (or off), unless the command says
    otherwise: on a CPU, a graphed run's resume is then one error line naming --no-cuda-graphs."""
    saved = {**asdict(TrainConfig()), "cuda_graphs_used": True}
    resumed = merge_resume_options(TrainConfig(resume="x"), saved, "x", given={"resume"})
    assert resumed.cuda_graphs is True
    with pytest.raises(UserError, match="--no-cuda-graphs"):
        resolve_cuda_graphs(resumed, "fp32", torch.device("cpu"), 1)
    overridden = merge_resume_options(TrainConfig(resume="x", cuda_graphs=False), saved, "x",
                                      given={"resume", "cuda_graphs"})
    assert overridden.cuda_graphs is False
    eager = merge_resume_options(TrainConfig(resume="x"), {**saved, "cuda_graphs_used": False}, "x", given={"resume"})
    assert eager.cuda_graphs is False


def test_graph_option_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = TrainConfig()
    assert resolve_cuda_graphs(auto, "bf16", cuda, 1) is True
    assert resolve_cuda_graphs(auto, "fp16", cuda, 1) is False
    assert resolve_cuda_graphs(replace(auto, compile=True), "bf16", cuda, 1) is False
    assert resolve_cuda_graphs(auto, "bf16", cuda, 2) is False
    assert resolve_cuda_graphs(auto, "fp32", cpu, 1) is False
    assert resolve_cuda_graphs(replace(auto, cuda_graphs=False), "bf16", cuda, 1) is False
    for cfg, precision, device, world, reason in [
            (replace(auto, cuda_graphs=True), "fp32", cpu, 1, "needs a CUDA GPU"),
            (replace(auto, cuda_graphs=True), "fp16", cuda, 1, "fp16"),
            (replace(auto, cuda_graphs=True, compile=True), "bf16", cuda, 1, "--compile"),
            (replace(auto, cuda_graphs=True), "bf16", cuda, 4, "one process")]:
        with pytest.raises(UserError, match=reason):
            resolve_cuda_graphs(cfg, precision, device, world)


def test_schedule_moves_to_a_device_whole():
    schedule = NoiseSchedule("linear", T)
    assert schedule.to("cpu") is schedule
    moved = schedule.to("meta")
    tensors = {k: v for k, v in vars(schedule).items() if torch.is_tensor(v)}
    assert tensors and all(getattr(moved, k).device.type == "meta" for k in tensors)
    assert all(v.device.type == "cpu" for v in tensors.values())  # the original is left as it was


# --------------------------------------------------------------------------------------------------
# CUDA: the captured graph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def _cuda_state(precision):
    torch.manual_seed(0)
    model = UNet.from_preset("tiny", image_size=SIZE, num_classes=NUM_CLASSES).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-2, device="cuda"), fused=True,
                                  capturable=True)
    for group in optimizer.param_groups:
        group["initial_lr"] = 1e-2
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    state = TrainState(model, make_ema(model, 0.9, 0), optimizer, sched, torch.amp.GradScaler("cuda", enabled=False),
                       torch.Generator("cuda").manual_seed(0), torch.Generator(), torch.device("cuda"))
    autocast = torch.autocast("cuda", torch.bfloat16) if precision == "bf16" else nullcontext()
    step = GradientStep(state, state.model, NoiseSchedule("linear", T).to("cuda"), autocast, max_grad_norm=1.0,
                        p_uncond=0.25, draws=_draws(device="cuda"))
    return state, step


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_replays_the_uncaptured_step_bit_for_bit(precision, monkeypatch):
    """8 steps (3 warm-up, a capture, replays) with new batches and a changing LR: the same weights, EMA,
    Adam moments and losses as the same steps run uncaptured; the replays make no host sync (compared
    after the steps: comparing reads the device)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # the same convolution algorithms
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    batches = [[(x.cuda(), y.cuda()) for x, y in b] for b in _batches(8)]
    (a, step_a), (b, step_b) = _cuda_state(precision), _cuda_state(precision)
    graphed, plain = GraphedStep(step_a, capture=True), GraphedStep(step_b, capture=False)
    losses = []
    for i, batch in enumerate(batches):
        if i == GraphedStep.WARMUP_STEPS + 1:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss_a, _, _ = graphed(batch)
            loss_b, _, _ = plain(batch)
            losses.append((loss_a.clone(), loss_b.clone()))
            for state, g in ((a, graphed), (b, plain)):
                state.lr_scheduler.step()
                g.sync_lr()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert graphed.graph is not None
    for i, (loss_a, loss_b) in enumerate(losses):
        assert torch.equal(loss_a, loss_b), i
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.ema.parameters(), b.ema.parameters()):
        assert torch.equal(p, q)
    for sa, sb in zip(a.optimizer.state.values(), b.optimizer.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


@needs_cuda
@pytest.mark.cuda
def test_cuda_training_run_uses_graphs_by_default(tmp_path):
    cfg = TrainConfig(preset="tiny", timesteps=T, batch_size=8, heldout_size=16, max_steps=8, sample_steps=2,
                      device="cuda", out=str(tmp_path / "runs"), judge_heldout=0, precision="bf16")
    result = train(cfg, edge_bar_dataset(64))
    options = json.loads((result.run_dir / "options.json").read_text())["options"]
    assert options["cuda_graphs_used"] is True
    assert math.isfinite(result.final_loss)
