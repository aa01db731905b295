"""Stage 5: judge generated samples with a small CNN classifier trained on the real data.

    python stage5_guidance/evaluate.py --checkpoint C --data-dir ../shared/data/mnist \\
        --classifier runs/classifier.pt --runs ddpm:1000,ddim:50 --per-class 20 --guidance-scale 1

Reports, as a printed table and as JSON (results.json in runs/evaluate/NNNNN-…/):
  * the classifier's accuracy on the real held-out images (the last --heldout of the dataset);
  * per class, the fraction of samples asked for that class that the classifier assigns to it;
  * the Fréchet distance between generated and held-out images on the classifier's penultimate
    features (torchmetrics), beside the real-vs-real floor (as many classifier-train images);
  * the Inception Score exp(E_x KL(p(y|x) ‖ p(y))) with the classifier's p(y|x), beside its upper
    bound (the class count) and the same score of as many real images;
  * for CIFAR-10 (or any data, given --inception-weights), the FID (Inception) against the held-out
    images and the Inception Score, with the FID Inception network of pytorch-fid / torch-fidelity
    (torchmetrics' default extractor); its weights are read from --inception-weights or torch.hub's
    cache, never downloaded, and their absence is one line before any work (for CIFAR-10,
    --no-inception-fid judges with the classifier alone and says so).
CIFAR-10's judge is a small ResNet trained on the train split; its held-out images are the test split
(the classifier's test accuracy, the FD reference, the floor's other half).
The FD above is on classifier features (JSON "frechet_distance"), comparable only within this project;
the FID (Inception) ("inception_fid") is the measure papers report (at 50,000 samples).
The JSON records the number of samples, sampler, steps, w and seeds of every run. Bad runs, a bad
--classifier path or --out are refused before any work; the numbered folder is made only once every
number exists, and a classifier trained now is saved before sampling starts.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from shared.diffusion.samplers import SAMPLERS, default_steps  # noqa: E402
from shared.errors import UserError  # noqa: E402
from shared.evaluation.classifier import (CIFAR_RECIPE, DEFAULT_EPOCHS, SHIFT_PIXELS, check_classifier_path,  # noqa: E402
                                          recipe_for)
from shared.evaluation.frechet import (INCEPTION_BATCH, InceptionLogits, InceptionPool, frechet_distance,  # noqa: E402
                                       load_fid_inception, resolve_fid_inception_weights)
from shared.evaluation.inception_score import torchmetrics_inception_score  # noqa: E402
from shared.evaluation.judge import JudgeSource, prepare_judge  # noqa: E402
from shared.evaluation.report import (balanced_labels, check_runs, format_table, parse_runs, seeds_for,  # noqa: E402
                                      summarise_run)
from shared import flags  # noqa: E402
from shared.interface import cli  # noqa: E402
from shared.interface.sampling_args import add_sampler_args, load_model, sampler_options, timed_sample  # noqa: E402
from shared.records.runs import check_writable_dir, make_run_dir, write_options  # noqa: E402
from shared.data.datasets import JUDGE_HELDOUT, JUDGED_ON_TEST_SPLIT  # noqa: E402


def build_parser():
    parser = flags.make_parser(__doc__)
    add_sampler_args(parser)
    cli.add_dataset_args(parser)
    g = parser.add_argument_group("evaluation")
    g.add_argument("--classifier", default=None,
                   help="classifier file: loaded if it exists, else trained on the non-held-out images and saved; "
                        "default runs/classifier.pt for mnist, runs/classifier-<dataset>.pt for the others")
    g.add_argument("--classifier-epochs", type=flags.positive_int, default=None,
                   help=f"epochs when the classifier is trained; default {DEFAULT_EPOCHS} "
                        f"({CIFAR_RECIPE.epochs} for cifar10)")
    g.add_argument("--classifier-shift", type=flags.int_in(0, 4), default=None,
                   help=f"± pixels of random translation when the classifier is trained; default {SHIFT_PIXELS} "
                        f"({CIFAR_RECIPE.shift_pixels} for cifar10, which also flips)")
    g.add_argument("--heldout", type=flags.positive_int, default=JUDGE_HELDOUT,
                   help="the last N real images: classifier accuracy and FD reference (never trained on); "
                        "cifar10 holds out its whole test split instead")
    g.add_argument("--per-class", type=flags.int_in(1, 10_000), default=20,
                   help="samples per class (or samples / 10 for an unconditional model)")
    g.add_argument("--runs", default=None,
                   help="several sampler:steps runs, e.g. ddpm:1000,ddim:50 (default: --sampler/--steps)")
    g.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="the FID Inception weights (weights-inception-2015-12-05-6726825d.pth from torch-fidelity's "
                        "releases) for the FID (Inception) and Inception Score; default: torch.hub's cache. CIFAR-10 "
                        "needs them unless --no-inception-fid; for other data they add those measures")
    g.add_argument("--no-inception-fid", action="store_true",
                   help="CIFAR-10: judge with the classifier alone (accuracy, FD, IS), without the FID (Inception)")
    g.add_argument("--out", default="runs/evaluate", help="parent of the auto-numbered output directory")
    return parser


# What each number in results.json is: the classifier-feature FD is not the FID papers report.
CLASSIFIER_MEASURES = {
    "frechet_distance": "FD (classifier features): Fréchet distance on the judge classifier's 128-d penultimate "
                        "features, beside real_floor; comparable only within this project",
    "inception_score": "IS (classifier): Inception Score with the judge classifier's p(y|x), beside its bound",
}
INCEPTION_MEASURES = {
    "inception_fid": "FID (Inception): Fréchet distance on the FID Inception network's 2048-d pool features "
                     "(pt_inception-2015-12-05, torchmetrics' default extractor) against the held-out images",
    "inception_is": "IS (Inception): Inception Score with the FID Inception network's 1008 logits, one split",
}


def load_fid_network(args):
    """(weights file, the FID Inception network) when this run reports the FID (Inception): CIFAR-10, or
    any data given --inception-weights; (None, None) otherwise. Called before any sampling, so that
    missing weights are one line that costs nothing."""
    if args.no_inception_fid or (args.dataset != "cifar10" and args.inception_weights is None):
        return None, None
    try:
        weights = resolve_fid_inception_weights(args.inception_weights)
    except UserError as err:
        if args.dataset != "cifar10" or args.inception_weights is not None:
            raise
        raise UserError(f"{err}; or give --no-inception-fid to judge with the classifier alone") from None
    return weights, load_fid_inception(str(weights))


def classifier_file(args) -> str:
    """--classifier, or the dataset's default file: one judge per dataset, never MNIST's for Fashion-MNIST."""
    if args.classifier is not None:
        return args.classifier
    return "runs/classifier.pt" if args.dataset == "mnist" else f"runs/classifier-{args.dataset}.pt"


def judge_notes(args, judge, fid_net) -> list[str]:
    """The lines that say what the figures were measured against: the test split where that is the
    held-out set, the data's caveat (CIFAR-10's JPEG copy), and a FID (Inception) left out."""
    notes = []
    if args.dataset in JUDGED_ON_TEST_SPLIT:
        notes.append(f"held out: the {args.dataset} test split ({judge.heldout_images.shape[0]:,} images): the "
                     f"classifier's test accuracy, the FD against it, and the floor: as many of the "
                     f"{judge.train_images.shape[0]:,} train images as samples, against it")
    if judge.data_note:
        notes.append(f"note: {judge.data_note}")
    if fid_net is None and args.dataset == "cifar10":
        notes.append("FID (Inception): not computed (--no-inception-fid; give --inception-weights FILE for it)")
    return notes


def add_inception_measures(report: dict, judge, samples_by_run: dict, count: int, seed: int, net, device) -> None:
    """FID (Inception) and Inception Score per run, and the real images' Inception Score at the same count."""
    net = net.to(device)
    pool, logits = InceptionPool(net), InceptionLogits(net)
    for run in report["runs"]:
        run["inception_fid"] = frechet_distance(pool, judge.heldout_images, samples_by_run[run["name"]],
                                                batch_size=INCEPTION_BATCH)
        run["inception_is"] = torchmetrics_inception_score(logits, samples_by_run[run["name"]], INCEPTION_BATCH)
    report["real_inception_is"] = torchmetrics_inception_score(logits, judge.real_images(count, seed), INCEPTION_BATCH)


def write_results(out: str, runs: list, args, device, report: dict) -> Path:
    """The numbered folder with options.json and results.json, made only now that every number exists;
    a failed write (a full disk) removes it again and is one line."""
    run_dir = make_run_dir(out, "-".join(f"{n}{s or ''}" for n, s in runs))
    try:
        write_options(run_dir, vars(args), device)
        (run_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    except OSError as err:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise UserError(f"cannot write the results in {str(run_dir)!r} ({err.strerror or type(err).__name__}); "
                        f"nothing was kept there") from None
    return run_dir


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    runs = parse_runs(args.runs, args.sampler, args.steps)
    check_runs(runs, SAMPLERS)
    args.classifier = classifier_file(args)
    check_classifier_path(args.classifier)
    check_writable_dir(args.out)
    inception_weights, fid_net = load_fid_network(args)
    model, schedule, meta, device = load_model(args)
    check_runs(runs, SAMPLERS, schedule.num_timesteps)
    image_shape = tuple(meta.get("image_shape") or (model.in_channels, model.image_size, model.image_size))
    changes = {"epochs": args.classifier_epochs, "shift_pixels": args.classifier_shift}
    recipe = recipe_for(args.dataset, **{k: v for k, v in changes.items() if v is not None})
    judge = prepare_judge(JudgeSource(args.dataset, args.data_dir, args.classifier, args.heldout), image_shape,
                          model.num_classes, device, recipe, progress=not args.no_progress)  # a classifier trained now is saved here already
    num_classes = judge.classifier.config["num_classes"] if model.num_classes == 0 else model.num_classes
    asked = balanced_labels(num_classes, args.per_class)
    seeds = seeds_for(args.seed, asked.numel())
    reference = {"real_floor": judge.floor(asked.numel(), seed=args.seed),
                 "real_inception_score": judge.real_inception_score(asked.numel(), seed=args.seed)}

    report = {"checkpoint": meta.get("checkpoint"), "dataset": args.dataset, "classifier": judge.source,
              "classifier_accuracy": judge.accuracy, "heldout_images": int(judge.heldout_images.shape[0]),
              "measures": {**CLASSIFIER_MEASURES, **(INCEPTION_MEASURES if fid_net is not None else {})},
              "inception_weights": None if inception_weights is None else str(inception_weights), "runs": []}
    samples_by_run = {}
    for name, steps in runs:
        labels = asked if model.num_classes else None
        images, rate = timed_sample(model, schedule, seeds, sampler_options(args, sampler=name, num_steps=steps),
                                    labels, device, progress=not args.no_progress)
        steps_used = default_steps(name, steps, schedule.num_timesteps)
        if not bool(torch.isfinite(images).all()):
            raise UserError(f"{name}-{steps_used}: the samples contain NaN or infinite values (a diverged "
                            f"checkpoint?); nothing was written")
        settings = {"sampler": name, "steps": steps_used, "eta": args.eta, "spacing": args.spacing,
                    "clip_x0": args.clip_x0, "guidance_scale": args.guidance_scale if model.num_classes else None,
                    "seeds": seeds, "images_per_s": rate}
        run = summarise_run(f"{name}-{steps_used}", judge.classifier, judge.feature, images, labels,
                            judge.heldout_images, reference, settings)
        report["runs"].append(run)
        samples_by_run[run["name"]] = images
    if fid_net is not None:
        add_inception_measures(report, judge, samples_by_run, asked.numel(), args.seed, fid_net, device)
    report["notes"] = judge_notes(args, judge, fid_net)
    run_dir = write_results(args.out, runs, args, device, report)
    print(format_table(report))
    for line in report["notes"]:
        print(line)
    print("FD: on classifier features (comparable within this project only)"
          + ("; FID (Inception): the published measure" if fid_net is not None else ""))
    print("images/s: " + ", ".join(f"{r['name']} {r['images_per_s']:.2f}" for r in report["runs"]))
    print(f"wrote {run_dir / 'results.json'}")
    return report


if __name__ == "__main__":
    flags.run_main(main)
