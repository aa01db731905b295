"""Stage 5: classifier-free guidance with a class-conditional checkpoint.

    python stage5_guidance/guide.py --checkpoint C --digit 7 --guidance-scale 3
    python stage5_guidance/guide.py --checkpoint C --prompt "seven"
    python stage5_guidance/guide.py --checkpoint C --grid                  # one row per class
    python stage5_guidance/guide.py --checkpoint C --sweep 0,1,2,3,5,7.5   # one row per w, same seeds
    python stage5_guidance/guide.py --checkpoint C --interactive           # a digit, a word, grid, quit

ε̃ = ε_u + w·(ε_c − ε_u): w = 0 unconditional, 1 conditional, > 1 guided (shared/guidance.py). Each run
writes runs/guide/NNNNN-<mode>/ with the pictures and results.json (options, images/s).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from shared.interface import cli  # noqa: E402
from shared.errors import UserError  # noqa: E402
from shared.diffusion.guidance import parse_prompt, prompt_loop  # noqa: E402
from shared.records.images import save_grid  # noqa: E402
from shared.records.runs import make_run_dir, write_options  # noqa: E402
from shared.diffusion.guidance import MAX_GUIDANCE  # noqa: E402
from shared.interface.sampling_args import PICTURE_SCALE, add_sampler_args, load_model, sampler_kwargs, timed_sample  # noqa: E402,E501


def build_parser():
    parser = cli.make_parser(__doc__)
    add_sampler_args(parser)
    g = parser.add_argument_group("what to draw (one of)")
    mode = g.add_mutually_exclusive_group(required=True)
    mode.add_argument("--digit", type=cli.nonneg_int, help="samples of this class")
    mode.add_argument("--prompt", help="a class as text: '7', 'seven', ' Seven ' (case and spaces ignored)")
    mode.add_argument("--grid", action="store_true", help="one row per class, the same seeds in every row")
    mode.add_argument("--sweep", type=cli.float_list, help="comma-separated guidance scales: one row each")
    mode.add_argument("--interactive", action="store_true", help="prompt loop: a digit, a word, grid, quit")
    g.add_argument("--n", type=cli.int_in(1, 1000), default=8, help="images per row (or per request)")
    g.add_argument("--sweep-label", type=cli.nonneg_int, default=None,
                   help="class of every --sweep image (default: column j shows class j mod K)")
    g.add_argument("--out", default="runs/guide", help="parent of the auto-numbered output directory")
    return parser


class Drawer:
    """Samples and saves pictures for one loaded model; every call reports images/s."""

    def __init__(self, args, model, schedule, device, run_dir: Path):
        self.args, self.model, self.schedule, self.device, self.run_dir = args, model, schedule, device, run_dir
        self.seeds = [args.seed + i for i in range(args.n)]
        self.results: list[dict] = []

    def _draw(self, labels: torch.Tensor, name: str, nrow: int, w: float | None = None) -> str:
        seeds = (self.seeds * (labels.numel() // len(self.seeds)))[:labels.numel()]
        kw = sampler_kwargs(self.args) if w is None else sampler_kwargs(self.args, guidance_scale=w)
        images, rate = timed_sample(self.model, self.schedule, seeds, self.device, labels=labels, **kw)
        path = self.run_dir / f"{name}.png"
        save_grid(images.clamp(-1, 1), path, nrow=nrow, scale=PICTURE_SCALE)
        self.results.append({"picture": path.name, "images": labels.numel(), "images_per_s": rate,
                             "guidance_scale": kw["guidance_scale"]})
        return f"wrote {path} ({labels.numel()} images, {rate:.2f} images/s)"

    def label(self, k: int) -> str:
        if not 0 <= k < self.model.num_classes:
            raise UserError(f"class must lie in [0, {self.model.num_classes - 1}], got {k}")
        return self._draw(torch.full((self.args.n,), k), f"class-{k}-{len(self.results):03d}", self.args.n)

    def grid(self) -> str:
        labels = torch.arange(self.model.num_classes).repeat_interleave(self.args.n)
        return self._draw(labels, f"grid-{len(self.results):03d}", self.args.n)

    def sweep(self, scales: list[float]) -> str:
        if self.args.sweep_label is not None and not 0 <= self.args.sweep_label < self.model.num_classes:
            raise UserError(f"--sweep-label must lie in [0, {self.model.num_classes - 1}]")
        row = (torch.full((self.args.n,), self.args.sweep_label) if self.args.sweep_label is not None
               else torch.arange(self.args.n) % self.model.num_classes)
        rows = []
        for w in scales:  # same seeds and labels in every row: only w changes
            kw = sampler_kwargs(self.args, guidance_scale=w)
            images, rate = timed_sample(self.model, self.schedule, self.seeds, self.device, labels=row, **kw)
            rows.append(images)
            self.results.append({"guidance_scale": w, "images": self.args.n, "images_per_s": rate})
            print(f"  w = {w:g}: {rate:.2f} images/s")
        path = self.run_dir / "sweep.png"
        save_grid(torch.cat(rows).clamp(-1, 1), path, nrow=self.args.n, scale=PICTURE_SCALE)
        return f"wrote {path} (rows: w = {', '.join(f'{w:g}' for w in scales)})"


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.sweep and any(not 0 <= w <= MAX_GUIDANCE for w in args.sweep):
        raise UserError(f"--sweep scales must lie in [0, {MAX_GUIDANCE}], got {args.sweep}")
    model, schedule, meta, device = load_model(args)
    if model.num_classes == 0:
        raise UserError(f"{args.checkpoint} is unconditional (trained without --class-cond): guidance needs labels")
    label = parse_prompt(args.prompt, model.num_classes, meta.get("dataset")) if args.prompt is not None else args.digit
    if label is not None and not 0 <= label < model.num_classes:
        raise UserError(f"--digit must lie in [0, {model.num_classes - 1}], got {label}")
    mode = "interactive" if args.interactive else "grid" if args.grid else "sweep" if args.sweep else f"class-{label}"
    run_dir = make_run_dir(args.out, mode)
    drawer = Drawer(args, model, schedule, device, run_dir)

    if args.interactive:
        prompt_loop(lambda: input("> "), drawer.label, drawer.grid, print, model.num_classes, meta.get("dataset"))
    elif args.grid:
        print(drawer.grid())
    elif args.sweep:
        print(drawer.sweep(args.sweep))
    else:
        print(drawer.label(label))
    write_options(run_dir, vars(args), device)
    (run_dir / "results.json").write_text(json.dumps(drawer.results, indent=2) + "\n")
    return drawer.results


if __name__ == "__main__":
    cli.run_main(main)
