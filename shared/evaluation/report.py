"""The evaluation report: which runs to make, one summary row per run, and the printed table.

A run is a (sampler, steps) pair from `--runs ddpm:1000,ddim:50`; `check_runs` refuses a bad one before
any output folder exists. Each row holds per-class accuracy, the Fréchet distance beside its real-vs-real
floor, and the Inception Score beside its upper bound (the class count) and the real-data value at the
same sample count.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from shared.errors import UserError
from shared.evaluation.classifier import SmallCNN, per_class_accuracy
from shared.evaluation.frechet import frechet_distance
from shared.evaluation.inception_score import classifier_inception_score


def seeds_for(first_seed: int, count: int) -> list[int]:
    return list(range(first_seed, first_seed + count))


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """[0, 1, …, K−1, 0, 1, …]: per_class of each class, interleaved so any prefix is balanced."""
    return torch.arange(num_classes).repeat(per_class)


def parse_runs(text: str | None, default_sampler: str, default_steps: int | None) -> list[tuple[str, int | None]]:
    """'ddpm:1000,ddim:50' → [('ddpm', 1000), ('ddim', 50)]; None → the single default run."""
    if not text:
        return [(default_sampler, default_steps)]
    runs: list[tuple[str, int | None]] = []
    for part in text.split(","):
        name, _, steps = part.strip().partition(":")
        try:
            runs.append((name, int(steps) if steps else None))
        except ValueError:
            raise UserError(f"--runs entries look like ddim:50, got {part!r}") from None
    return runs


def check_runs(runs: list[tuple[str, int | None]], samplers: tuple[str, ...], num_timesteps: int | None = None) -> None:
    """UserError for an unknown sampler or a step count outside [1, T] (T = num_timesteps when known)."""
    for name, steps in runs:
        if name not in samplers:
            raise UserError(f"--runs: unknown sampler {name!r}; choose one of {', '.join(samplers)}")
        if steps is not None and steps < 1:
            raise UserError(f"--runs {name}:{steps}: steps must be >= 1")
        if steps is not None and num_timesteps is not None and steps > num_timesteps:
            raise UserError(f"--runs {name}:{steps}: steps exceed the model's T = {num_timesteps}")


def summarise_run(name: str, classifier: SmallCNN, feature: nn.Module, samples: torch.Tensor,
                  asked: torch.Tensor | None, heldout_images: torch.Tensor, reference: dict, settings: dict) -> dict:
    """One row of the report.

    samples: [N x C x H x W] in [−1, 1]; asked: the class each sample was drawn for, [N] (None:
    unconditional, so there are no per-class accuracies); reference: the real-data values at the same
    N, {"real_floor": FD, "real_inception_score": IS}.
    """
    per = {} if asked is None else per_class_accuracy(classifier, samples, asked, classifier.config["num_classes"])
    return {"name": name, "num_samples": int(samples.shape[0]), **settings,
            "per_class_accuracy": {str(k): v for k, v in per.items()},
            "mean_class_accuracy": sum(per.values()) / len(per) if per else None,
            "frechet_distance": frechet_distance(feature, heldout_images, samples),
            "real_floor": reference["real_floor"],
            "inception_score": classifier_inception_score(classifier, samples),
            "inception_score_bound": int(classifier.config["num_classes"]),
            "real_inception_score": reference["real_inception_score"]}


def _cell(value, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def format_table(report: dict) -> str:
    """A fixed-width text table of evaluate's report: one row per sampler run, each measure beside its
    real-data reference (FD and floor; IS, real IS and the bound K in the header)."""
    classes = sorted({int(k) for run in report["runs"] for k in run["per_class_accuracy"]})
    bound = next((run.get("inception_score_bound") for run in report["runs"]), None)
    is_head = f"IS≤{bound}" if bound else "IS"
    head = (f"{'run':<16}{'n':>6}{'w':>6}{'mean acc':>10}{'FD':>9}{'floor':>8}{is_head:>8}{'real IS':>8}  "
            + " ".join(f"{k:>5}" for k in classes))
    lines = [f"classifier accuracy on real held-out data: {100 * report['classifier_accuracy']:.2f} % "
             f"({report['heldout_images']} images)", head, "-" * len(head)]
    for run in report["runs"]:
        per = run["per_class_accuracy"]
        cells = " ".join(f"{100 * per.get(str(k), float('nan')):5.1f}" for k in classes)
        w = "-" if run.get("guidance_scale") is None else f"{run['guidance_scale']:g}"
        mean = "-" if run["mean_class_accuracy"] is None else f"{100 * run['mean_class_accuracy']:.1f}%"
        lines.append(f"{run['name']:<16}{run['num_samples']:>6}{w:>6}{mean:>10}{run['frechet_distance']:>9.3f}"
                     f"{run['real_floor']:>8.3f}{_cell(run.get('inception_score'), '.3f', 8)}"
                     f"{_cell(run.get('real_inception_score'), '.3f', 8)}  {cells}")
    for run in report["runs"]:
        if "inception_fid" in run or "inception_is" in run:
            lines.append(f"{run['name']}: FID (Inception) {run.get('inception_fid', float('nan')):.3f}, "
                         f"IS (Inception) {run.get('inception_is', float('nan')):.3f} "
                         f"(real {report.get('real_inception_is', float('nan')):.3f})")
    return "\n".join(lines)
