"""Quality against training minutes: judge accuracy at w = 1 and w = 3 and FD / floor, one point per
evaluated snapshot of one training run.

    python scripts/quality_curve.py --images-per-s 171 \\
        --evals runs/evaluate/00000-ddim50 runs/evaluate/00001-ddim50 ... --out stage3_train/assets/cpu_quality.png

Each --evals folder is one stage5_guidance/evaluate.py output (results.json) of a snapshot written by
`train.py --keep-snapshots` (ema-<step>.pt) or of the final ema.pt. A snapshot's step comes from its
checkpoint's metadata. Minutes: step × batch / --images-per-s, the training time at one steady speed
(give the run's median images/s from its log.csv: a machine whose load changes during the run would
otherwise bend the time axis). Prints the table it plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.errors import UserError  # noqa: E402
from shared import flags  # noqa: E402
from shared.records.checkpoint import load_checkpoint  # noqa: E402
from shared.records.plots import plt, save_figure_atomically  # noqa: E402  (pyplot on the Agg backend)


# The dashed lines: the CPU recipe's goals for a 10-minute run (stage3_train/README.md), judge accuracy
# at w = 1 and w = 3 and FD / floor at w = 1.
ACCURACY_GOALS = (97.0, 100.0)
FD_RATIO_GOAL = 1.5


def points(evals: list[Path]) -> dict[int, dict]:
    """step → {'acc_w1', 'acc_w3', 'fd_ratio_w1', 'fd_ratio_w3', 'samples'} from evaluate.py results."""
    out: dict[int, dict] = {}
    for folder in evals:
        if not (folder / "results.json").is_file():
            raise UserError(f"{folder} holds no results.json (an evaluate.py output folder is expected)")
        report = json.loads((folder / "results.json").read_text())
        step = int(load_checkpoint(report["checkpoint"])["meta"]["step"])
        for run in report["runs"]:
            w = f"w{run['guidance_scale']:g}"
            point = out.setdefault(step, {})
            point[f"acc_{w}"] = 100 * run["mean_class_accuracy"]
            point[f"fd_ratio_{w}"] = run["frechet_distance"] / run["real_floor"]
            point["samples"] = run["num_samples"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images-per-s", type=flags.positive_float, required=True,
                   help="training speed for the time axis (e.g. the median of log.csv's images_per_s)")
    p.add_argument("--batch-size", type=flags.positive_int, default=128)
    p.add_argument("--evals", type=Path, nargs="+", required=True, help="evaluate.py output folders")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    table = points(args.evals)
    steps = sorted(table)
    minutes = [s * args.batch_size / args.images_per_s / 60 for s in steps]
    print("step  minutes  samples  acc w=1  acc w=3  FD/floor w=1  FD/floor w=3")
    for s, m in zip(steps, minutes):
        t = table[s]
        print(f"{s:5d}  {m:7.1f}  {t['samples']:7d}  {t.get('acc_w1', float('nan')):6.1f}%  "
              f"{t.get('acc_w3', float('nan')):6.1f}%  {t.get('fd_ratio_w1', float('nan')):12.2f}  "
              f"{t.get('fd_ratio_w3', float('nan')):12.2f}")

    fig, (acc, fd) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in (("acc_w1", "w = 1 (no guidance)"), ("acc_w3", "w = 3")):
        acc.plot(minutes, [table[s].get(key, float("nan")) for s in steps], "o-", label=label)
    for target in ACCURACY_GOALS:
        acc.axhline(target, color="grey", lw=0.8, ls="--")
    acc.set(xlabel="training minutes (2 CPU cores)", ylabel="samples judged as the asked digit (%)",
            title="judge accuracy")
    acc.legend()
    for key, label in (("fd_ratio_w1", "w = 1"), ("fd_ratio_w3", "w = 3")):
        fd.plot(minutes, [table[s].get(key, float("nan")) for s in steps], "o-", label=label)
    fd.axhline(FD_RATIO_GOAL, color="grey", lw=0.8, ls="--")
    fd.set(xlabel="training minutes (2 CPU cores)", ylabel="FD / real-vs-real floor", yscale="log",
           title="Fréchet distance (classifier features)")
    fd.legend()
    fig.tight_layout()
    save_figure_atomically(fig, args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    flags.run_main(main)
