"""Stage 4: draw samples from a trained checkpoint with DDPM, DDIM, DPM-Solver++(2M), Euler or Heun.

    python stage4_sampling/sample.py --checkpoint runs/00000-mnist-mnist-bf16 --sampler ddim --steps 50
    python stage4_sampling/sample.py --checkpoint C --sampler heun --steps 10         # Karras sigmas, 19 NFE
    python stage4_sampling/sample.py --checkpoint C --sampler ddpm --trajectory        # x_t / x̂0 strip + GIF
    python stage4_sampling/sample.py --checkpoint C --compare-steps 10,20,50,100,1000  # same seeds, side by side
    python stage4_sampling/sample.py --checkpoint C --compare-steps 10,50,200 --classifier runs/classifier.pt \\
        --data-dir ../shared/data/mnist                                                 # + quality vs steps

Each run writes runs/samples/NNNNN-<sampler>-<steps>/ with every sample as images/NNNNNN.png and in
samples.npz (uint8 images N x H x W x C, labels, seeds), samples.png (the first 100), results.json
(images/s and NFE, the network evaluations per image), options.json and the pictures asked for. The math
lives in shared.diffusion.steps / shared.diffusion.samplers; a v- or x0-prediction checkpoint is sampled
as such (its record says which).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from shared.diffusion.samplers import count_nfe, default_steps  # noqa: E402
from shared.errors import UserError  # noqa: E402
from shared.evaluation.classifier import per_class_accuracy  # noqa: E402
from shared.evaluation.frechet import frechet_distance  # noqa: E402
from shared.evaluation.judge import JudgeSource, prepare_judge  # noqa: E402
from shared import flags  # noqa: E402
from shared.interface import cli  # noqa: E402
from shared.interface.sampling_args import (add_sampler_args, check_seeds, default_labels, load_model,  # noqa: E402
                                            output_run_dir, sampler_options, timed_batches, timed_sample)
from shared.records.images import PICTURE_SCALE, SampleWriter, save_grid  # noqa: E402
from shared.records.plots import plot_quality_vs_steps  # noqa: E402
from shared.records.runs import check_writable_dir, write_options  # noqa: E402
from shared.records.trajectory import TrajectoryRecorder  # noqa: E402
from shared.data.datasets import JUDGE_HELDOUT  # noqa: E402

COMPARE_COLUMNS = 10  # images per row of compare.png and samples.png
GRID_IMAGES = 100  # samples.png shows the first 100 samples; images/ and samples.npz hold every one


def build_parser():
    parser = flags.make_parser(__doc__)
    add_sampler_args(parser)
    g = parser.add_argument_group("what to draw")
    g.add_argument("--n", type=flags.int_in(1, 100_000), default=64, help="number of samples")
    g.add_argument("--label", type=flags.nonneg_int, default=None,
                   help="class of every sample (class-conditional models; default: round-robin over classes)")
    g.add_argument("--trajectory", action="store_true", help="also write trajectory.png and trajectory.gif")
    g.add_argument("--compare-steps", type=flags.int_list, default=None,
                   help="comma-separated step counts: the same seeds at each, one row per count")
    g.add_argument("--out", default="runs/samples", help="parent of the auto-numbered output directory")
    e = parser.add_argument_group("quality against step count (with --compare-steps)")
    e.add_argument("--classifier", default=None,
                   help="a classifier file of stage5_guidance/evaluate.py; trained there if missing")
    cli.add_dataset_args(e)
    e.add_argument("--heldout", type=flags.positive_int, default=JUDGE_HELDOUT, help="real images held out for the FD")
    return parser


def _draw_all(args, model, schedule, seeds, labels, device, run_dir, recorder) -> tuple[torch.Tensor, float]:
    """Samples batch by batch, each batch written as it comes (bounded memory at any --n).

    Returns (the first GRID_IMAGES samples, images/s of the sampling alone)."""
    writer = SampleWriter(run_dir, len(seeds), (model.in_channels, model.image_size, model.image_size))
    shown, kept, seconds = [], 0, 0.0
    for first, images, spent in timed_batches(model, schedule, seeds, sampler_options(args), labels, device,
                                              callback=recorder, progress=not args.no_progress):
        seconds += spent
        batch = slice(first, first + images.shape[0])
        writer.add(images, labels[batch] if labels is not None else None, seeds[batch])
        if kept < GRID_IMAGES:
            shown.append(images[:GRID_IMAGES - kept].cpu())
            kept += shown[-1].shape[0]
    writer.close()
    return torch.cat(shown), len(seeds) / seconds


def _compare(args, model, schedule, seeds, labels, device, judge) -> tuple[list[dict], torch.Tensor]:
    """The same seeds at each of --compare-steps: (result rows, the first COMPARE_COLUMNS images of each)."""
    rows, entries = [], []
    floor = judge.floor(args.n) if judge is not None else None
    for steps in args.compare_steps:
        out, rate = timed_sample(model, schedule, seeds, sampler_options(args, num_steps=steps), labels, device,
                                 progress=not args.no_progress)
        rows.append(out[:COMPARE_COLUMNS])
        entry = {"sampler": args.sampler, "steps": steps, "images_per_s": rate,
                 "nfe": count_nfe(sampler_options(args, num_steps=steps), schedule.num_timesteps)}
        if judge is not None:
            entry.update(frechet_distance=frechet_distance(judge.feature, judge.heldout_images, out),
                         real_floor=floor, mean_class_accuracy=None)
            if labels is not None:
                per = per_class_accuracy(judge.classifier, out, labels, model.num_classes)
                entry["mean_class_accuracy"] = sum(per.values()) / len(per)
        entries.append(entry)
        print(f"  {steps:>5} steps ({entry['nfe']} NFE): {rate:.2f} images/s" +
              (f", FD {entry['frechet_distance']:.3f} (floor {floor:.3f})" if judge else ""))
    return entries, torch.cat(rows)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    # Every check, and the classifier, before any sampling and before the output folder exists.
    check_writable_dir(args.out)
    seeds = check_seeds(args.seed, args.n)
    model, schedule, meta, device = load_model(args)
    if args.compare_steps and max(args.compare_steps) > schedule.num_timesteps:
        raise UserError(f"--compare-steps {max(args.compare_steps)} exceeds the model's T = {schedule.num_timesteps}")
    labels = default_labels(model, args.n, args.label)
    judge = None
    if args.compare_steps and args.classifier:
        judge = prepare_judge(JudgeSource(args.dataset, args.data_dir, args.classifier, args.heldout),
                              meta.get("image_shape", (model.in_channels, model.image_size, model.image_size)),
                              model.num_classes, device, progress=not args.no_progress)

    steps_name = default_steps(args.sampler, args.steps, schedule.num_timesteps)
    results: dict = {"checkpoint": meta.get("checkpoint"), "seeds": [seeds[0], seeds[-1]], "runs": []}
    recorder = TrajectoryRecorder() if args.trajectory else None
    with output_run_dir(args.out, f"{args.sampler}-{steps_name}") as run_dir:
        shown, rate = _draw_all(args, model, schedule, seeds, labels, device, run_dir, recorder)
        nfe = count_nfe(sampler_options(args), schedule.num_timesteps)
        results["runs"].append({"sampler": args.sampler, "steps": steps_name, "nfe": nfe, "images_per_s": rate})
        print(f"{args.sampler}-{steps_name}: {args.n} images at {rate:.2f} images/s on {device}, {nfe} NFE "
              f"({meta.get('prediction', 'eps')}-prediction model)")
        nrow = min(args.n, COMPARE_COLUMNS)
        save_grid(shown.clamp(-1, 1), run_dir / "samples.png", nrow=nrow, scale=PICTURE_SCALE)
        if recorder is not None:
            recorder.save(shown, run_dir)
        if args.compare_steps:
            quality, compare = _compare(args, model, schedule, seeds, labels, device, judge)
            results["runs"].extend(quality)
            save_grid(compare.clamp(-1, 1), run_dir / "compare.png", nrow=nrow, scale=PICTURE_SCALE)
            if judge is not None:
                results["classifier_accuracy"] = judge.accuracy
                plot_quality_vs_steps(quality, run_dir / "quality.png")
        write_options(run_dir, vars(args), device)
        (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {run_dir}")
    return results


if __name__ == "__main__":
    flags.run_main(main)
