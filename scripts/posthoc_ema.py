"""Post-hoc EMA (Karras et al. 2024, EDM2): rebuild EMAs of other decays from a run's ema-<step>.pt
snapshots, and with --fd pick the decay by the Fréchet distance of their samples.

    python scripts/posthoc_ema.py runs/00000-mnist-cpu-bf16 --decays 0.99,0.995,0.998,0.999
    python scripts/posthoc_ema.py RUN --decays 0.99,0.995,0.998,0.999 --fd --data-dir ../shared/data/mnist
    python stage5_guidance/evaluate.py --checkpoint RUN/ema-posthoc-0.995.pt ...   # loads like ema.pt

Writes RUN/ema-posthoc-<decay>.pt for each decay (ema.pt's format, with a "posthoc_ema" record in its
meta: the snapshot steps, their coefficients and the fit's residuals) and prints each fit. The target is
the bias-corrected EMA of that decay over the run, or with --warmup W the EMA that --ema-decay D
--ema-warmup W would have stored (shared/training/posthoc_ema.py states the method and its
approximation). --fd draws the same seeds from each rebuilt EMA and from the stored ema.pt (DDIM, 50
steps, w = 1 unless told), judges them with stage 5's classifier, prints FD / floor and accuracy per
decay and the decay with the lowest FD, and writes RUN/posthoc.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared import flags  # noqa: E402
from shared.data.datasets import JUDGE_HELDOUT  # noqa: E402
from shared.diffusion.samplers import SAMPLERS, SamplerOptions  # noqa: E402
from shared.evaluation.judge import JudgeSource, prepare_judge  # noqa: E402
from shared.evaluation.report import balanced_labels, seeds_for, summarise_run  # noqa: E402
from shared.interface import cli  # noqa: E402
from shared.interface.sampling_args import timed_sample  # noqa: E402
from shared.model.precision import PRECISIONS  # noqa: E402
from shared.records.checkpoint import EMA_NAME, atomic_save, load_for_sampling  # noqa: E402
from shared.training.posthoc_ema import posthoc_ema, posthoc_name, snapshots  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = flags.make_parser(__doc__)
    p.add_argument("run", type=Path, help="a run directory with ema-<step>.pt snapshots (train.py --keep-snapshots K)")
    p.add_argument("--decays", type=flags.float_list, required=True, help="comma-separated EMA decays in (0, 1)")
    p.add_argument("--warmup", type=flags.nonneg_int, default=None,
                   help="target the EMA with this --ema-warmup (default: the bias-corrected EMA, no warm-up)")
    g = p.add_argument_group("picking the decay by FD (--fd)")
    g.add_argument("--fd", action="store_true", help="sample each decay (and ema.pt) and compare their FD")
    cli.add_dataset_args(g)
    g.add_argument("--classifier", default="runs/classifier.pt", help="stage 5's classifier file (trained if missing)")
    g.add_argument("--heldout", type=flags.positive_int, default=JUDGE_HELDOUT, help="real images held out for the FD")
    g.add_argument("--per-class", type=flags.int_in(1, 10_000), default=50, help="samples per class")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    g.add_argument("--steps", type=flags.positive_int, default=50)
    g.add_argument("--guidance-scale", type=flags.float_in(0.0, 20.0), default=1.0)
    g.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype of the U-Net")
    g.add_argument("--batch-size", type=flags.positive_int, default=250)
    g.add_argument("--seed", type=flags.nonneg_int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--no-progress", action="store_true")
    return p


def judge_files(args, files: dict[str, Path]) -> list[dict]:
    """One summary row per file ({"name", FD, floor, accuracy, …}), the same seeds and labels for all."""
    device = flags.pick_device(args.device)
    first, _, meta = load_for_sampling(next(iter(files.values())), device)
    judge = prepare_judge(JudgeSource(args.dataset, args.data_dir, args.classifier, args.heldout),
                          meta.get("image_shape") or (first.in_channels, first.image_size, first.image_size),
                          first.num_classes, device, progress=not args.no_progress)
    labels = balanced_labels(first.num_classes or judge.classifier.config["num_classes"], args.per_class)
    seeds = seeds_for(args.seed, labels.numel())
    reference = {"real_floor": judge.floor(labels.numel(), seed=args.seed),
                 "real_inception_score": judge.real_inception_score(labels.numel(), seed=args.seed)}
    opts = SamplerOptions(sampler=args.sampler, num_steps=args.steps, guidance_scale=args.guidance_scale,
                          precision=args.precision, batch_size=args.batch_size)
    rows = []
    for name, path in files.items():
        model, schedule, _ = load_for_sampling(path, device)
        asked = labels if model.num_classes else None
        images, rate = timed_sample(model, schedule, seeds, opts, asked, device, progress=not args.no_progress)
        rows.append(summarise_run(name, judge.classifier, judge.feature, images, asked, judge.heldout_images,
                                  reference, {"file": str(path), "images_per_s": rate}))
        print(f"  {name:>18}: FD {rows[-1]['frechet_distance']:.3f} (floor {reference['real_floor']:.3f})")
    return rows


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    loaded = snapshots(args.run)
    print(f"{len(loaded)} snapshots at steps {', '.join(str(step) for step, _ in loaded)}")
    files, fits = {}, {}
    for decay in args.decays:
        file, fit = posthoc_ema(loaded, decay, args.warmup)
        path = atomic_save(file, args.run / posthoc_name(decay, args.warmup))
        files[f"decay {decay:g}"], fits[f"decay {decay:g}"] = path, fit
        print(f"{path.name}: residual ‖r‖/‖T‖ {fit.residual:.3f}, cumulative gap {fit.cdf_gap:.3f}, coefficients "
              + " ".join(f"{c:+.3f}" for c in fit.coefficients))
    report = {"run": str(args.run), "warmup": args.warmup,
              "fits": {k: {"residual": f.residual, "cdf_gap": f.cdf_gap, "coefficients": f.coefficients}
                       for k, f in fits.items()}}
    if args.fd:
        rows = judge_files(args, {**files, f"stored {EMA_NAME}": args.run / EMA_NAME})
        print("candidate            FD/floor  accuracy")
        for row in rows:
            accuracy = row["mean_class_accuracy"]
            print(f"{row['name']:<20} {row['frechet_distance'] / row['real_floor']:8.3f}  "
                  + (f"{100 * accuracy:6.1f}%" if accuracy is not None else "     -"))
        best = min((r for r in rows if r["name"] in files), key=lambda r: r["frechet_distance"])
        print(f"lowest FD: {best['name']} ({best['file']})")
        report.update(runs=rows, best=best["name"])
        (args.run / "posthoc.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    flags.run_main(main)
