"""Inpainting and class-conditional editing without retraining (RePaint, Lugmayr et al. 2022): the
resampling path against diffusers' RePaintScheduler, the forward jump's closed form, the kept pixels
unchanged and the filled region judged as the asked class (the tiny bar model and a classifier), per-sample
seeds, no host reads per step, and every bad input as one error line (library, stage 5 CLI)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from shared import UserError
from shared.diffusion.forward import q_jump, q_sample
from shared.diffusion.inpainting import Inpainting, RePaint, repaint_moves, repaint_nfe, repaint_path
from shared.diffusion.noise import seeds_tensor
from shared.diffusion.samplers import SamplerOptions, count_nfe, make_sampler
from shared.diffusion.schedule import NoiseSchedule
from shared.evaluation.classifier import ClassifierRecipe, class_probabilities, train_classifier
from shared.interface.sampling_args import inpainting_from_png
from shared.records.images import to_uint8
from tests.scripts import load_script
from tests.stage3_helpers import REPO
from tests.test_sampler_interface import HostReads
from tests.tiny_trained import (NUM_CLASSES, SIZE, bar_patterns, draw, one_thread, random_conditional_unet,  # noqa: F401
                                save_tiny_checkpoint, trained_tiny_model)

KEEP_ROWS = slice(12, None)  # the source's bottom rows (with its class-4 bar on rows 14-15) are kept


@pytest.mark.parametrize("steps, jump, resamplings", [(10, 2, 2), (25, 5, 3), (50, 10, 10), (7, 3, 1), (12, 4, 5)])
def test_the_path_is_diffusers_repaint_schedule(steps, jump, resamplings):
    """Our positions, read as diffusers' timesteps ((S − 1 − p)·T//S), are RePaintScheduler's list, and the
    network runs once per move down, as in diffusers' RePaintPipeline loop."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional test dependency")
    T = 100
    ref = diffusers.RePaintScheduler(num_train_timesteps=T)
    ref.set_timesteps(steps, jump_length=jump, jump_n_sample=resamplings)
    path = repaint_path(steps, jump, resamplings)
    assert path[0] == 0 and path[-1] == steps and all(abs(b - a) == 1 for a, b in zip(path, path[1:]))
    assert [(steps - 1 - p) * (T // steps) for p in path[:-1]] == ref.timesteps.tolist()
    evaluations, last = 0, ref.timesteps[0] + 1
    for t in ref.timesteps:
        evaluations += int(t < last)
        last = t
    assert repaint_nfe(steps, jump, resamplings) == evaluations
    moves = repaint_moves(path)
    assert all(b == a + 1 for a, b in moves if b > a) and all(a - b == jump for a, b in moves if b < a)


def test_the_forward_jump_is_q_of_x_t_given_x_s():
    """q(x_t | x_s) composed with q(x_s | x0) is q(x_t | x0): the x0 coefficient is √ᾱ_t and the two noise
    coefficients' squares add to 1 − ᾱ_t (float64, by linearity)."""
    schedule = NoiseSchedule("cosine", 200)
    x0, zero, one = torch.ones(1, 1, 2, 2, dtype=torch.float64), torch.zeros(1, 1, 2, 2, dtype=torch.float64), \
        torch.ones(1, 1, 2, 2, dtype=torch.float64)
    for s, t in ((-1, 0), (-1, 199), (10, 11), (10, 150)):
        through = q_jump(schedule, q_sample(schedule, x0, s, zero) if s >= 0 else x0, s, t, zero)
        assert float(through[0, 0, 0, 0]) == pytest.approx(float(schedule.sqrt_alphas_cumprod[t]), rel=1e-12)
        c1 = float(q_jump(schedule, q_sample(schedule, zero, s, one) if s >= 0 else zero, s, t, zero)[0, 0, 0, 0])
        c2 = float(q_jump(schedule, zero, s, t, one)[0, 0, 0, 0])
        assert c1 ** 2 + c2 ** 2 == pytest.approx(1 - float(schedule.alphas_cumprod[t]), rel=1e-12)
    with pytest.raises(ValueError, match="t_from < t_to"):
        q_jump(schedule, x0, 20, 10, zero)


def _source_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = bar_patterns(10, seed=4)
    assert int(labels[4]) == 4  # a horizontal bar on rows 14-15
    mask = torch.ones(1, SIZE, SIZE, dtype=torch.bool)
    mask[:, KEEP_ROWS] = False  # fill (draw) everything above row 12
    return images[4], mask


@pytest.fixture(scope="module")
def judge():
    images, labels = bar_patterns(400, seed=11)
    return train_classifier(images, labels, NUM_CLASSES, ClassifierRecipe(epochs=3, batch_size=64, shift_pixels=0),
                            progress=False)


@pytest.mark.parametrize("sampler, steps", [("ddim", 20), ("ddpm", 25)])
def test_kept_pixels_are_the_source_and_the_fill_is_the_asked_class(judge, sampler, steps):
    """Class-conditional editing: below row 12 the source (a class-4 bar) stays bit for bit; above it the
    model draws the class asked for, which the classifier reads off the filled region alone (the kept rows
    blanked to background). Measured: 27 of 28 at w = 3 with r = 3 resamplings (20 of 28 without)."""
    model, schedule = trained_tiny_model()
    source, mask = _source_and_mask()
    classes = torch.tensor([0, 1, 2, 5, 6, 7, 8]).repeat_interleave(4)  # bars that lie (mostly) in the fill
    out = draw(model, schedule, list(range(classes.numel())), labels=classes, sampler=sampler, num_steps=steps,
               guidance_scale=3.0, inpaint=Inpainting(source, mask, jump_length=5, resamplings=3))
    assert torch.equal(out[:, :, KEEP_ROWS], source[None, :, KEEP_ROWS].expand(classes.numel(), -1, -1, -1))
    filled_only = torch.where(mask, out, torch.tensor(-1.0)).clamp(-1, 1)
    judged = class_probabilities(judge, filled_only).argmax(dim=1)
    assert (judged == classes).float().mean() >= 0.85, judged.tolist()


def test_a_mask_that_keeps_everything_returns_the_source():
    model, schedule = random_conditional_unet(), NoiseSchedule("linear", 20)
    source = torch.rand(1, 8, 8) * 2 - 1
    out = draw(model, schedule, [1, 2], labels=[0, 2], sampler="ddpm", num_steps=6,
               inpaint=Inpainting(source, torch.zeros(1, 8, 8, dtype=torch.bool), 2, 2))
    assert torch.equal(out, source.expand(2, -1, -1, -1))


def test_each_inpainted_image_depends_on_its_seed_only():
    model, schedule = random_conditional_unet(), NoiseSchedule("linear", 20)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    kw = dict(sampler="ddim", num_steps=6, eta=0.5, guidance_scale=2.0, clip_x0=True,
              inpaint=Inpainting(torch.zeros(1, 8, 8), mask, 2, 3))
    together = draw(model, schedule, [3, 4, 5], labels=[0, 1, 2], batch_size=3, **kw)
    alone = draw(model, schedule, [4], labels=[1], **kw)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)
    assert (together[0] - together[1]).abs().max() > 1e-2


def test_the_repaint_chain_reads_nothing_back_from_the_device():
    model, schedule = random_conditional_unet(), NoiseSchedule("linear", 20)
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[:, 2:6] = True
    opts = SamplerOptions(sampler="ddpm", num_steps=8, guidance_scale=2.0, inpaint=Inpainting(torch.zeros(1, 8, 8),
                                                                                                mask, 3, 2))
    chain = RePaint(model, make_sampler(schedule, opts), seeds_tensor([1, 2], "cpu"), torch.tensor([0, 1]))
    counter = HostReads(schedule)
    with torch.no_grad(), counter:
        chain.run()
    assert counter.reads == [], counter.reads[:5]
    assert count_nfe(opts, 20) == repaint_nfe(8, 3, 2)


def test_bad_inpainting_inputs_are_user_errors():
    model, schedule = random_conditional_unet(), NoiseSchedule("linear", 20)
    good = Inpainting(torch.zeros(1, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool), 2, 2)
    for sampler in ("dpmpp", "euler", "heun"):
        with pytest.raises(UserError, match="inpainting resamples"):
            SamplerOptions(sampler=sampler, inpaint=good).check()
    with pytest.raises(UserError, match="drop --cuda-graphs"):
        SamplerOptions(sampler="ddim", inpaint=good, cuda_graphs=True).check()
    cases = [(Inpainting(torch.zeros(1, 16, 16), torch.ones(1, 16, 16, dtype=torch.bool)), "model draws"),
             (Inpainting(torch.zeros(1, 8, 8), torch.ones(1, 8, 8)), "bool"),
             (Inpainting(torch.zeros(1, 8, 8), torch.ones(1, 8, 7, dtype=torch.bool)), "mask is 7×8"),
             (Inpainting(torch.full((1, 8, 8), 2.0), torch.ones(1, 8, 8, dtype=torch.bool)), r"\[-1, 1\]"),
             (Inpainting(torch.zeros(1, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool), 0, 2), "jump_length"),
             (Inpainting(torch.zeros(1, 8, 8), torch.ones(1, 8, 8, dtype=torch.bool), 2, 101), "resamplings")]
    for inpaint, match in cases:
        with pytest.raises(UserError, match=match):
            draw(model, schedule, [0], labels=[0], sampler="ddim", num_steps=4, inpaint=inpaint)


def _png_bytes(pixels: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_png_inputs_decode_to_the_source_and_a_binary_mask():
    source = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, 3:] = 255
    got = inpainting_from_png(_png_bytes(source), _png_bytes(mask), (1, 8, 8), 3, 4)
    assert torch.equal(to_uint8(got.source)[0], torch.from_numpy(source))
    assert torch.equal(got.mask[0], torch.from_numpy(mask == 255)) and (got.jump_length, got.resamplings) == (3, 4)
    rgb = inpainting_from_png(_png_bytes(np.stack([source] * 3, -1)), _png_bytes(mask), (3, 8, 8))
    assert rgb.source.shape == (3, 8, 8) and rgb.mask.shape == (1, 8, 8)
    soft = mask.copy()
    soft[0, 3] = 200
    for src, msk, match in ((b"GIF89a junk", _png_bytes(mask), "source: not an image"),
                            (_png_bytes(source), _png_bytes(soft), "binary.*e.g. 200"),
                            (_png_bytes(source[:, :6]), _png_bytes(mask), "source: the image is 6×8"),
                            (_png_bytes(source), _png_bytes(np.zeros((9, 9), np.uint8)), "mask: the image is 9×9")):
        with pytest.raises(UserError, match=match):
            inpainting_from_png(src, msk, (1, 8, 8))


# --------------------------------------------------------------------------------------------------
# stage 5's CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ckpt"))


@pytest.fixture
def pictures(tmp_path):
    source, mask = _source_and_mask()
    Image.fromarray(to_uint8(source)[0].numpy()).save(tmp_path / "source.png")
    Image.fromarray((mask[0].numpy() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    return tmp_path / "source.png", tmp_path / "mask.png"


def _guide(argv: list[str], capsys) -> tuple[int, list[str]]:
    from shared import flags

    guide = load_script(REPO / "stage5_guidance" / "guide.py")
    try:
        flags.run_main(guide.main, argv)
    except SystemExit as exit_info:
        return exit_info.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return 0, []


def test_guide_py_inpaints_and_keeps_the_sources_rows(checkpoint, pictures, tmp_path, capsys):
    source, mask = pictures
    code, _ = _guide(["--checkpoint", str(checkpoint), "--digit", "6", "--inpaint", str(source), "--mask", str(mask),
                      "--sampler", "ddim", "--steps", "10", "--jump-length", "2", "--resamplings", "2",
                      "--guidance-scale", "3", "--n", "3", "--out", str(tmp_path / "out"), "--no-progress",
                      "--device", "cpu"], capsys)
    assert code == 0
    run = next((tmp_path / "out").iterdir())
    assert run.name.endswith("inpaint-class-6")
    for name in ("inpaint-source.png", "inpaint-mask.png", "samples.npz", "results.json"):
        assert (run / name).is_file()
    images = np.load(run / "samples.npz")["images"][..., 0]       # uint8 [N x H x W]
    kept = np.asarray(Image.open(source))[KEEP_ROWS]
    assert images.shape == (3, SIZE, SIZE) and all(np.array_equal(img[KEEP_ROWS], kept) for img in images)
    assert "NFE" in capsys.readouterr().out


@pytest.mark.parametrize("change, needle", [
    (["--mask", "MISSING"], "missing.png: cannot read it (No such file"),
    (["--mask", None], "needs both --inpaint SOURCE.png and --mask MASK.png"),
    (["--inpaint", "WRONG_SIZE"], "the image is 8×8, but the model draws 16×16"),
    (["--mask", "SOFT"], "the mask must be binary"),
    (["--sampler", "heun"], "use --sampler ddpm or ddim, not heun"),
])
def test_guide_py_bad_inpainting_inputs_are_one_line(checkpoint, pictures, tmp_path, capsys, change, needle):
    source, mask = pictures
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small.png")
    soft = np.asarray(Image.open(mask)).copy()
    soft[0, 0] = 128
    Image.fromarray(soft).save(tmp_path / "soft.png")
    names = {"MISSING": str(tmp_path / "missing.png"), "WRONG_SIZE": str(tmp_path / "small.png"),
             "SOFT": str(tmp_path / "soft.png")}
    args = {"--inpaint": str(source), "--mask": str(mask), "--sampler": "ddim"}
    flag, value = change
    args[flag] = names.get(value, value)
    argv = ["--checkpoint", str(checkpoint), "--digit", "2", "--steps", "4", "--out", str(tmp_path / "out"),
            "--device", "cpu", "--no-progress"] + [x for k, v in args.items() if v is not None for x in (k, v)]
    code, lines = _guide(argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no run folder made
