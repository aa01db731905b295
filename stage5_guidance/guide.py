"""Stage 5: classifier-free guidance with a class-conditional checkpoint.

    python stage5_guidance/guide.py --checkpoint C --digit 7 --guidance-scale 3
    python stage5_guidance/guide.py --checkpoint C --prompt "seven"
    python stage5_guidance/guide.py --checkpoint C --grid                  # one row per class
    python stage5_guidance/guide.py --checkpoint C --sweep 0,1,2,3,5,7.5   # one row per w, same seeds
    python stage5_guidance/guide.py --checkpoint C --interactive           # a digit, a word, grid, quit
    python stage5_guidance/guide.py --checkpoint C --digit 3 --inpaint digit.png --mask mask.png --sampler ddim \
        --steps 50 --guidance-scale 3      # keep digit.png where mask.png is black, draw a 3 where it is white

ε̃ = ε_u + w·(ε_c − ε_u): w = 0 unconditional, 1 conditional, > 1 guided (shared/diffusion/guidance.py);
--guidance-rescale and --guidance-interval refine it. --inpaint/--mask edit an image without retraining
(RePaint, shared/diffusion/inpainting.py): the class asked for fills the white part of the mask. Each run
writes runs/guide/NNNNN-<mode>/ with the pictures, every image as images/NNNNNN.png and in samples.npz
(uint8 images, labels, seeds; not in --interactive), results.json (images/s, NFE) and options.json; with
--inpaint also inpaint-source.png and inpaint-mask.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from shared.diffusion.guidance import MAX_GUIDANCE  # noqa: E402
from shared.errors import UserError  # noqa: E402
from shared import flags  # noqa: E402
from shared.interface.prompts import parse_prompt, prompt_loop  # noqa: E402
from shared.diffusion.samplers import count_nfe  # noqa: E402
from shared.interface.sampling_args import (add_inpaint_args, add_sampler_args, check_seeds, load_inpainting,  # noqa: E402
                                            load_model, output_run_dir, sampler_options, timed_sample)
from shared.records.images import PICTURE_SCALE, SampleWriter, save_grid  # noqa: E402
from shared.records.runs import check_writable_dir, write_options  # noqa: E402


def build_parser():
    parser = flags.make_parser(__doc__)
    add_sampler_args(parser)
    g = parser.add_argument_group("what to draw (one of)")
    mode = g.add_mutually_exclusive_group(required=True)
    mode.add_argument("--digit", type=flags.nonneg_int, help="samples of this class")
    mode.add_argument("--prompt", help="a class as text: '7', 'seven', ' Seven ' (case and spaces ignored)")
    mode.add_argument("--grid", action="store_true", help="one row per class, the same seeds in every row")
    mode.add_argument("--sweep", type=flags.float_list, help="comma-separated guidance scales: one row each")
    mode.add_argument("--interactive", action="store_true", help="prompt loop: a digit, a word, grid, quit")
    g.add_argument("--n", type=flags.int_in(1, 1000), default=8, help="images per row (or per request)")
    g.add_argument("--sweep-label", type=flags.nonneg_int, default=None,
                   help="class of every --sweep image (default: column j shows class j mod K)")
    g.add_argument("--out", default="runs/guide", help="parent of the auto-numbered output directory")
    add_inpaint_args(parser)
    return parser


class Drawer:
    """Samples the pictures of one loaded model; `save` writes those drawn so far. Every call reports images/s."""

    def __init__(self, args, model, schedule, device, inpaint=None):
        self.args, self.model, self.schedule, self.device, self.inpaint = args, model, schedule, device, inpaint
        self.seeds = check_seeds(args.seed, args.n)
        self.nfe = count_nfe(sampler_options(args, inpaint=inpaint), schedule.num_timesteps)
        self.results: list[dict] = []
        # (file name, images, images per row, labels, seeds) of the pictures drawn and not yet written
        self.pending: list[tuple[str, torch.Tensor, int, torch.Tensor, list[int]]] = []

    def _draw(self, labels: torch.Tensor, name: str, nrow: int) -> str:
        seeds = (self.seeds * (labels.numel() // len(self.seeds)))[:labels.numel()]
        images, rate = timed_sample(self.model, self.schedule, seeds, sampler_options(self.args, inpaint=self.inpaint),
                                    labels, self.device, progress=not self.args.no_progress)
        self.pending.append((f"{name}.png", images, nrow, labels, seeds))
        self.results.append({"picture": f"{name}.png", "images": labels.numel(), "images_per_s": rate,
                             "guidance_scale": self.args.guidance_scale, "nfe": self.nfe})
        return f"{name}.png: {labels.numel()} images, {rate:.2f} images/s, {self.nfe} NFE"

    def label(self, k: int) -> str:
        if not 0 <= k < self.model.num_classes:
            raise UserError(f"class must lie in [0, {self.model.num_classes - 1}], got {k}")
        return self._draw(torch.full((self.args.n,), k), f"class-{k}-{len(self.results):03d}", self.args.n)

    def grid(self) -> str:
        labels = torch.arange(self.model.num_classes).repeat_interleave(self.args.n)
        return self._draw(labels, f"grid-{len(self.results):03d}", self.args.n)

    def sweep(self, scales: list[float]) -> str:
        row = (torch.full((self.args.n,), self.args.sweep_label) if self.args.sweep_label is not None
               else torch.arange(self.args.n) % self.model.num_classes)
        rows, seeds = [], []
        for w in scales:  # same seeds and labels in every row: only w changes
            opts = sampler_options(self.args, guidance_scale=w, inpaint=self.inpaint)
            images, rate = timed_sample(self.model, self.schedule, self.seeds, opts, row, self.device,
                                        progress=not self.args.no_progress)
            rows.append(images)
            seeds += self.seeds
            self.results.append({"guidance_scale": w, "images": self.args.n, "images_per_s": rate, "nfe": self.nfe})
            print(f"  w = {w:g}: {rate:.2f} images/s")
        self.pending.append(("sweep.png", torch.cat(rows), self.args.n, row.repeat(len(scales)), seeds))
        return f"sweep.png: rows w = {', '.join(f'{w:g}' for w in scales)}"

    def save(self, run_dir: Path, every_image: bool = True) -> list[Path]:
        """Writes the pending pictures into run_dir (and forgets them); every_image also writes each
        image as images/NNNNNN.png and all of them in samples.npz, in the order of the pictures."""
        paths = []
        for name, images, nrow, _, _ in self.pending:
            save_grid(images.clamp(-1, 1), run_dir / name, nrow=nrow, scale=PICTURE_SCALE)
            paths.append(run_dir / name)
        if every_image:
            count = sum(images.shape[0] for _, images, _, _, _ in self.pending)
            writer = SampleWriter(run_dir, count, tuple(self.pending[0][1].shape[1:]))
            for _, images, _, labels, seeds in self.pending:
                writer.add(images, labels, seeds)
            paths.append(writer.close())
        self.pending.clear()
        return paths


def _check(args, model, meta, inpaint) -> int | None:
    """Every check of the flags against the model, before sampling; returns the class asked for."""
    sampler_options(args, inpaint=inpaint).check()  # e.g. inpainting with a sampler it cannot rewind
    if model.num_classes == 0:
        raise UserError(f"{args.checkpoint} is unconditional (trained without --class-cond): guidance needs labels")
    if args.sweep and any(not 0 <= w <= MAX_GUIDANCE for w in args.sweep):
        raise UserError(f"--sweep scales must lie in [0, {MAX_GUIDANCE}], got {args.sweep}")
    if args.sweep_label is not None and not 0 <= args.sweep_label < model.num_classes:
        raise UserError(f"--sweep-label must lie in [0, {model.num_classes - 1}], got {args.sweep_label}")
    label = parse_prompt(args.prompt, model.num_classes, meta.get("dataset")) if args.prompt is not None else args.digit
    if label is not None and not 0 <= label < model.num_classes:
        raise UserError(f"--digit must lie in [0, {model.num_classes - 1}], got {label}")
    return label


def _interactive(args, drawer: Drawer, meta: dict) -> None:
    """The prompt loop; each picture is written as soon as it is drawn (a failed write is reported and the
    loop goes on)."""
    with output_run_dir(args.out, "interactive") as run_dir:
        def written(message: str) -> str:
            try:
                drawer.save(run_dir, every_image=False)
            except OSError as err:
                drawer.pending.clear()
                raise UserError(f"cannot write into {str(run_dir)!r} ({err.strerror or err})") from None
            return f"wrote {run_dir}/{message}"

        prompt_loop(lambda: input("> "), lambda k: written(drawer.label(k)), lambda: written(drawer.grid()), print,
                    drawer.model.num_classes, meta.get("dataset"))
        write_options(run_dir, vars(args), drawer.device)
        (run_dir / "results.json").write_text(json.dumps(drawer.results, indent=2) + "\n")


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    check_writable_dir(args.out)
    model, schedule, meta, device = load_model(args)
    inpaint = load_inpainting(args, (model.in_channels, model.image_size, model.image_size))
    label = _check(args, model, meta, inpaint)
    drawer = Drawer(args, model, schedule, device, inpaint)
    if args.interactive:
        _interactive(args, drawer, meta)
        return drawer.results

    mode = ("inpaint-" if inpaint is not None else "") + ("grid" if args.grid else "sweep" if args.sweep
                                                          else f"class-{label}")
    message = drawer.grid() if args.grid else drawer.sweep(args.sweep) if args.sweep else drawer.label(label)
    with output_run_dir(args.out, mode) as run_dir:
        drawer.save(run_dir)
        if inpaint is not None:  # what was kept and what was filled, beside the results
            save_grid(inpaint.source[None], run_dir / "inpaint-source.png", nrow=1, scale=PICTURE_SCALE)
            save_grid(inpaint.mask[None].float() * 2 - 1, run_dir / "inpaint-mask.png", nrow=1, scale=PICTURE_SCALE)
        write_options(run_dir, vars(args), device)
        (run_dir / "results.json").write_text(json.dumps(drawer.results, indent=2) + "\n")
    print(f"wrote {run_dir}/{message}")
    return drawer.results


if __name__ == "__main__":
    flags.run_main(main)
