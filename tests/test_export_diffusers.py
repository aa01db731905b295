"""Export to a diffusers pipeline folder: diffusers' UNet2DModel and DDPMScheduler, loaded from the
written files, compute what our U-Net and our DDPM step compute (diffusers is an optional test dependency)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared import UNet, UserError
from shared.diffusion.schedule import NoiseSchedule
from shared.diffusion.steps import ddpm_step
from shared.model.blocks import Downsample, Upsample
from shared.model.export_diffusers import export_diffusers, unet2d_config, unet2d_state_dict
from shared.model.unet import PRESETS
from shared.records.checkpoint import EMA_NAME, atomic_save, ema_file, load_for_sampling
from tests.tiny_trained import one_thread  # noqa: F401

pytest.importorskip("safetensors", reason="the export writes safetensors (pip install -e '.[test]')")
diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional test dependency")

ROOT = Path(__file__).resolve().parents[1]


def randomized(model, std=0.05):
    """Noise in every weight, so the zero-initialised layers do not hide a wrong mapping."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.eval()


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("preset, conv_resample", [(name, PRESETS[name]["conv_resample"]) for name in sorted(PRESETS)]
                         + [("tiny", False), ("cpu", True)])
def test_unet2dmodel_matches_our_unet(preset, conv_resample, num_classes):
    """The config and weights the export writes (the file round trip is tested on the tiny model below).

    Without resampling convs, diffusers' resampler convs get fixed weights computing our 2×2 average and
    nearest-neighbour doubling; they are the only parameters diffusers has and we do not."""
    model = randomized(UNet.from_preset(preset, num_classes=num_classes, conv_resample=conv_resample))
    theirs = diffusers.UNet2DModel(**unet2d_config(model)).eval()
    theirs.load_state_dict(unet2d_state_dict(model), strict=True)
    c, size = model.in_channels, model.image_size
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, c, size, size, generator=gen)
    t = torch.tensor([7, 912])
    y = torch.tensor([3, num_classes]) if num_classes else None  # a class and the null class
    with torch.no_grad():
        ours, out = model(x, t, y), theirs(x, t, class_labels=y).sample
    assert ours.abs().max() > 0.01  # a real signal, not two zero outputs
    torch.testing.assert_close(out, ours, atol=1e-4, rtol=0)
    fixed = sum(m.channels * (9 * m.channels + 1) for m in model.modules()
                if isinstance(m, (Downsample, Upsample)) and m.conv is None)
    assert (fixed > 0) == (not conv_resample)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in model.parameters()) + fixed


@pytest.mark.parametrize("kind, steps", [("linear", 1000), ("cosine", 200), ("linear", 50)])
def test_scheduler_has_our_betas_and_our_ddpm_step(tmp_path, kind, steps):
    schedule = NoiseSchedule(kind, steps)
    export_diffusers(UNet.from_preset("tiny"), schedule.betas, tmp_path / "pipe")
    sched = diffusers.DDPMScheduler.from_pretrained(tmp_path / "pipe" / "scheduler")
    torch.testing.assert_close(sched.betas.double(), schedule.betas, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(sched.alphas_cumprod.double(), schedule.alphas_cumprod, atol=1e-6, rtol=1e-5)
    gen = torch.Generator().manual_seed(2)
    x_t, eps = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    for t in (steps - 1, steps // 2, 1, 0):
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
        ours = ddpm_step(schedule, x_t, eps, t, noise=noise if t > 0 else None, clip_x0=True).x_prev
        theirs = sched.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_export_command_from_a_checkpoint(tmp_path):
    """The command reads an EMA checkpoint the way the samplers do and writes a DDPMPipeline folder."""
    model = randomized(UNet.from_preset("tiny", image_size=16, attention_resolutions=(8,), num_classes=10))
    schedule = NoiseSchedule("cosine", 100)
    meta = {"dataset": "mnist", "num_classes": 10, "image_shape": [1, 16, 16], "schedule": schedule.to_dict()}
    (tmp_path / "run").mkdir()
    atomic_save(ema_file(model.config, model.state_dict(), schedule.to_dict(), meta), tmp_path / "run" / EMA_NAME)
    res = subprocess.run([sys.executable, str(ROOT / "stage2_unet" / "export.py"), str(tmp_path / "run"),
                          str(tmp_path / "pipe")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    loaded, _, _ = load_for_sampling(tmp_path / "run")
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    t, y = torch.tensor([0, 30, 60, 99]), torch.tensor([0, 4, 9, 10])
    with torch.no_grad():
        ours = model(x, t, y)
        torch.testing.assert_close(loaded(x, t, y), ours)
        torch.testing.assert_close(pipe.unet(x, t, class_labels=y).sample, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(pipe.scheduler.betas.double(), schedule.betas, atol=1e-7, rtol=1e-6)


def test_bad_exports_are_one_line_errors_and_change_nothing(tmp_path):
    model = UNet.from_preset("tiny")
    betas = NoiseSchedule("linear", 10).betas
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        export_diffusers(model, betas, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
    with pytest.raises(UserError, match="does not exist"):
        export_diffusers(model, betas, tmp_path / "missing" / "pipe")
    with pytest.raises(UserError, match=r"channel_mult\[0\]"):
        unet2d_config(UNet.from_preset("tiny", channel_mult=(2, 2)))
    res = subprocess.run([sys.executable, str(ROOT / "stage2_unet" / "export.py"), str(tmp_path / "nothing"),
                          str(tmp_path / "pipe")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert res.stderr.startswith("error:") and not (tmp_path / "pipe").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("recorded, expected", [(None, "epsilon"), ("v", "v_prediction"), ("x0", "sample")])
def test_export_command_writes_the_checkpoints_prediction_type(tmp_path, recorded, expected):
    """The checkpoint's prediction record (absent: ε) reaches diffusers' prediction_type through the loader."""
    model = UNet.from_preset("tiny", image_size=8, attention_resolutions=(4,))
    schedule = NoiseSchedule("linear", 20)
    meta = {"dataset": "mnist", "num_classes": 0, "image_shape": [1, 8, 8], "schedule": schedule.to_dict()}
    if recorded is not None:
        meta["prediction"] = recorded
    (tmp_path / "run").mkdir()
    atomic_save(ema_file(model.config, model.state_dict(), schedule.to_dict(), meta), tmp_path / "run" / EMA_NAME)
    res = subprocess.run([sys.executable, str(ROOT / "stage2_unet" / "export.py"), str(tmp_path / "run"),
                          str(tmp_path / "pipe")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert diffusers.DDPMScheduler.from_pretrained(tmp_path / "pipe" / "scheduler").config.prediction_type == expected
