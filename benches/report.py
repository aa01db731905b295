"""Turns pytest-benchmark JSON from `pytest benches --benchmark-json=...` into a markdown report and a chart.

    python benches/report.py RUN.json [MORE.json ...] --out benches/results/cpu-2core.md \
        [--json-out benches/results/cpu-2core.json] [--png benches/results/cpu-2core.png] [--note TEXT]

Per table row (one `case`), the median time of each implementation, then ratios measured in the same run:
    speed-up fused vs X = time(X) / time(fused) = throughput(fused) / throughput(X)   (> 1: fused faster)
and the fused version's GB/s or TFLOP/s as a % of the ceiling measured in the same run (copy bandwidth,
bf16 matmul). The training table also gives each implementation's kernel launch calls and the kernels the
GPU ran, per step (`launches_per_step` / `kernels_per_step`: a CUDA graph is one launch of many kernels).
The project's performance bars (BARS below: kernels, sampling step, loops) are checked
where they apply: MET or MISSED next to the figure, and again in a summary; a bar with no figure reads
NOT MEASURED. Thresholds are fixed here; nothing about a measurement is adjusted to meet them.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make `shared` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matplotlib import ticker  # noqa: E402

from shared.errors import UserError  # noqa: E402
from shared.flags import run_main  # noqa: E402
from shared.records.plots import plt  # noqa: E402  (pyplot on the Agg backend)

KERNEL_IMPLS = ["eager", "compile", "sdpa", "fused"]
TRAIN_IMPLS = ["eager", "fused", "graphs", "fused+graphs", "compile", "fused+compile"]
SAMPLING_IMPLS = ["eager", "fused step", "fused", "fused+graphs", "sample() eager", "sample() fused step",
                  "sample() fused"]
NOISE_BASE = "torch.randn"  # what per-sample noise is compared with (benches/bench_noise.py)
LOOP_IMPLS = ["before", "after"]  # the training loop before and after the sync-free step (bench_train.py)
# the CPU recipe's step with its `cpu` preset and with the layout it is compared with (bench_train.py)
CPU_RECIPE_IMPLS = ["32/64/64 with resampling convs", "cpu preset"]
FAMILY_TITLES = {"kernel": "Kernels (Triton)", "step": "Fused sampling step (C++/CUDA)",
                 "train": "Training step (images/s, peak VRAM, launches per step)", "sampling": "Sampling (images/s)",
                 "noise": "Per-sample noise (Philox) and in-kernel noise",
                 "train_loop": "Training loop (images/s, consecutive steps with data and EMA)",
                 "cpu_recipe": "The CPU recipe's training step (images/s)"}


# --------------------------------------------------------------------------------------------------
# loading


@dataclass
class Row:
    """One case: its shared labels and, per implementation, its figures (extra_info plus time_ms)."""
    family: str
    case: str
    info: dict
    impls: dict[str, dict]

    def time(self, impl: str) -> float | None:
        return self.impls.get(impl, {}).get("time_ms")

    def get(self, impl: str, key: str) -> float | None:
        return self.impls.get(impl, {}).get(key)


def load_runs(paths: list[Path]) -> dict:
    """Merges pytest-benchmark JSON files: benchmarks concatenated, machine info of the first."""
    merged = {"benchmarks": [], "machine_info": None, "datetime": None, "ddpm_bench_skipped": []}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"benchmark JSON {str(path)!r} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{str(path)!r} is not pytest-benchmark JSON ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
            raise UserError(f"{str(path)!r} is not pytest-benchmark JSON (no 'benchmarks' list)")
        merged["benchmarks"] += data["benchmarks"]
        merged["machine_info"] = merged["machine_info"] or data.get("machine_info")
        merged["datetime"] = merged["datetime"] or data.get("datetime")
        merged["ddpm_bench_skipped"] += data.get("ddpm_bench_skipped", [])
        merged.setdefault("commit_info", data.get("commit_info"))
    return merged


def rows_by_family(run: dict) -> dict[str, list[Row]]:
    rows: dict[tuple[str, str], Row] = {}
    for bench in run["benchmarks"]:
        info = dict(bench.get("extra_info") or {})
        if "family" not in info or "case" not in info or "impl" not in info:
            continue
        if "time_ms" not in info and bench.get("stats"):
            info["time_ms"] = bench["stats"]["median"] * 1e3
        key = (info["family"], info["case"])
        row = rows.setdefault(key, Row(info["family"], info["case"], info, {}))
        row.impls[info["impl"]] = info
    out: dict[str, list[Row]] = {}
    for (family, _), row in rows.items():
        out.setdefault(family, []).append(row)
    return out


# --------------------------------------------------------------------------------------------------
# ratios and bars


def speedup(row: Row, fast: str, base: str) -> float | None:
    """time(base) / time(fast): how many times faster `fast` ran than `base` in this run."""
    t_fast, t_base = row.time(fast), row.time(base)
    return t_base / t_fast if t_fast and t_base else None


def throughput_ratio(row: Row, a: str, b: str, key: str = "images_per_s") -> float | None:
    va, vb = row.get(a, key), row.get(b, key)
    return va / vb if va and vb else None


@dataclass(frozen=True)
class Bar:
    """A fixed target: `value(row)` compared with `threshold` on the rows `applies` selects."""
    topic: str                        # what the bar is about: "kernels", "sampling step", "loops"
    text: str
    device: str                       # "cuda" or "cpu": where the bar is stated
    family: str
    applies: Callable[[dict], bool]   # on the row's shared labels
    value: Callable[[Row], float | None]
    threshold: float
    at_most: bool = False             # True: value ≤ threshold meets it
    unit: str = "×"

    def check(self, row: Row) -> tuple[float | None, bool | None]:
        v = self.value(row)
        if v is None:
            return None, None
        return v, (v <= self.threshold if self.at_most else v >= self.threshold)

    def short(self) -> str:
        return f"{'≤' if self.at_most else '≥'} {self.threshold:g}{self.unit}"


def _is(**want) -> Callable[[dict], bool]:
    def match(info: dict) -> bool:
        return all(info.get(k) in v if isinstance(v, (list, tuple, set)) else info.get(k) == v
                   for k, v in want.items())
    return match


def _time_ratio(row: Row, impl: str, base: str) -> float | None:
    """time(impl) / time(base): the cost of impl in units of base (< 1: impl is cheaper)."""
    t_impl, t_base = row.time(impl), row.time(base)
    return t_impl / t_base if t_impl and t_base else None


def _pct(row: Row) -> float | None:
    return row.get("fused", "pct_of_ceiling")


BARS = [
    Bar("loops", "mnist training, fused kernels + bf16 vs eager bf16 (images/s)", "cuda", "train",
        _is(preset="mnist", dtype="bf16"), lambda r: throughput_ratio(r, "fused", "eager"), 1.3),
    Bar("loops", "mnist training, peak VRAM fused bf16 / eager bf16", "cuda", "train",
        _is(preset="mnist", dtype="bf16"), lambda r: throughput_ratio(r, "fused", "eager", "peak_vram_mib"),
        0.8, at_most=True),
    Bar("loops", "DDIM-50 at batch 64, fused (kernels + step) vs eager (images/s)", "cuda", "sampling",
        _is(sampler="DDIM-50", batch=64), lambda r: throughput_ratio(r, "fused", "eager"), 2.0),
    Bar("kernels", "GN+FiLM+SiLU forward 256×128×32×32 bf16, fused vs eager", "cuda", "kernel",
        _is(op="gn_fwd", dtype="bf16", size="large"), lambda r: speedup(r, "fused", "eager"), 3.0),
    Bar("kernels", "GN+FiLM+SiLU forward 256×128×32×32 bf16, fused vs torch.compile", "cuda", "kernel",
        _is(op="gn_fwd", dtype="bf16", size="large"), lambda r: speedup(r, "fused", "compile"), 1.2),
    Bar("kernels", "GN+FiLM+SiLU forward 256×128×32×32 bf16, % of copy bandwidth", "cuda", "kernel",
        _is(op="gn_fwd", dtype="bf16", size="large"), _pct, 75.0, unit=" %"),
    # Stated without a size: checked at every bf16 size measured.
    Bar("kernels", "GN+FiLM+SiLU forward+backward bf16, fused vs eager", "cuda", "kernel",
        _is(op="gn_fwd+bwd", dtype="bf16"), lambda r: speedup(r, "fused", "eager"), 2.0),
    Bar("kernels", "attention forward+backward, fused vs eager", "cuda", "kernel",
        _is(op="attn_fwd+bwd"), lambda r: speedup(r, "fused", "eager"), 3.0),
    Bar("kernels", "attention forward+backward at L = 64–256, fused vs scaled_dot_product_attention", "cuda", "kernel",
        _is(op="attn_fwd+bwd", L=[64, 196, 256]), lambda r: speedup(r, "fused", "sdpa"), 1.0),
    Bar("sampling step", "sampling step on CPU (2 cores), every variant at 256×1×28×28 and larger, fused vs eager",
        "cpu", "step",
        lambda info: True, lambda r: speedup(r, "fused", "eager"), 2.0),
    Bar("sampling step", "sampling step at MNIST batches, fused vs eager", "cuda", "step",
        _is(size=["MNIST b64", "MNIST b256"]), lambda r: speedup(r, "fused", "eager"), 4.0),
    Bar("sampling step", "sampling step at the large size, % of copy bandwidth", "cuda", "step",
        _is(size="large"), _pct, 85.0, unit=" %"),
    *(Bar("noise", "per-sample noise 1024×3×32×32, op time / one torch.randn", device, "noise",
          _is(op="per_sample_noise"), lambda r: _time_ratio(r, "op", NOISE_BASE), 1.5, at_most=True)
      for device in ("cpu", "cuda")),
]


def bars_for(row: Row) -> list[Bar]:
    device = str(row.info.get("device", ""))
    return [b for b in BARS if b.family == row.family and device.startswith(b.device) and b.applies(row.info)]


def verdict(bar: Bar, row: Row) -> str:
    value, met = bar.check(row)
    if met is None:
        return f"{bar.short()}: NOT MEASURED"
    return f"{bar.short()}: {value:.2f}{bar.unit} {'MET' if met else 'MISSED'}"


# --------------------------------------------------------------------------------------------------
# markdown


def _f(value: float | None, fmt: str = "{:.3g}") -> str:
    return "—" if value is None else fmt.format(value)


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1e3:.1f} µs" if value < 1 else f"{value:.3g} ms"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def kernel_table(rows: list[Row]) -> list[str]:
    impls = [i for i in KERNEL_IMPLS if any(i in r.impls for r in rows)]
    header = ["case"] + [f"{i} (median)" for i in impls] + [
        "fused vs eager", "fused vs compile", "fused vs sdpa", "fused achieved", "% of ceiling", "bars"]
    lines = []
    for r in rows:
        fused = r.impls.get("fused", {})
        achieved = (f"{fused['gbps']:.0f} GB/s" if "gbps" in fused else
                    f"{fused['tflops']:.1f} TFLOP/s" if "tflops" in fused else "—")
        pct = fused.get("pct_of_ceiling")
        lines.append([r.case] + [_ms(r.time(i)) for i in impls] + [
            _x(speedup(r, "fused", "eager")), _x(speedup(r, "fused", "compile")),
            _x(speedup(r, "fused", "sdpa")) if "sdpa" in r.impls else "—", achieved,
            _f(pct, "{:.0f} % of " + fused.get("ceiling", "")) if pct is not None else "—",
            "<br>".join(verdict(b, r) for b in bars_for(r)) or ""])
    return _table(header, lines)


def _launches(row: Row, impls: list[str]) -> str:
    """Kernel launch calls per step and kernels the GPU ran per step, of each implementation measured."""
    cells = [f"{i}: {_f(row.get(i, 'launches_per_step'), '{:.0f}')} / {_f(row.get(i, 'kernels_per_step'), '{:.0f}')}"
             for i in impls if row.get(i, "launches_per_step") is not None]
    return "<br>".join(cells) or "—"


def train_table(rows: list[Row]) -> list[str]:
    impls = [i for i in TRAIN_IMPLS if any(i in r.impls for r in rows)]
    ratios = [("fused", "eager"), ("graphs", "eager"), ("fused+graphs", "eager"), ("fused", "compile")]
    ratios = [(a, b) for a, b in ratios if a in impls and b in impls] or [("fused", "eager")]
    header = (["case"] + [f"{i} img/s" for i in impls] + [f"{i} peak MiB" for i in impls]
              + [f"{a} vs {b}" for a, b in ratios] + ["VRAM fused / eager", "launches / kernels per step", "bars"])
    lines = []
    for r in rows:
        lines.append([r.case] + [_f(r.get(i, "images_per_s"), "{:.0f}") for i in impls]
                     + [_f(r.get(i, "peak_vram_mib"), "{:.0f}") for i in impls]
                     + [_x(throughput_ratio(r, a, b)) for a, b in ratios]
                     + [_x(throughput_ratio(r, "fused", "eager", "peak_vram_mib")), _launches(r, impls),
                        "<br>".join(verdict(b, r) for b in bars_for(r))])
    return _table(header, lines)


def _sampling_base(impl: str) -> str:
    """What a sampling variant is compared with: the shipped sampler with its own eager run."""
    return "sample() eager" if impl.startswith("sample()") else "eager"


def sampling_table(rows: list[Row]) -> list[str]:
    impls = [i for i in SAMPLING_IMPLS if any(i in r.impls for r in rows)]
    ratios = [(i, _sampling_base(i)) for i in impls if i != _sampling_base(i)]
    header = (["case", "steps timed / total"] + [f"{i} img/s" for i in impls]
              + [f"{i} vs {base}" for i, base in ratios] + ["bars"])
    lines = []
    for r in rows:
        lines.append([r.case, f"{r.info.get('steps_timed', '?')} / {r.info.get('steps_total', '?')}"]
                     + [_f(r.get(i, "images_per_s")) for i in impls]
                     + [_x(throughput_ratio(r, i, base)) for i, base in ratios]
                     + ["<br>".join(verdict(b, r) for b in bars_for(r))])
    return _table(header, lines)


def noise_table(rows: list[Row]) -> list[str]:
    """Each implementation's median, and its time over the first column's (torch.randn for the noise,
    the op-noise-then-step for the step): the cost in units of the reference, measured in one run."""
    impls = list(dict.fromkeys(i for r in rows for i in r.impls))
    header = ["case"] + [f"{i} (median)" for i in impls] + ["time / first column", "bars"]
    lines = []
    for r in rows:
        base = next(iter(r.impls))
        ratios = [f"{i}: {_x(_time_ratio(r, i, base))}" for i in r.impls if i != base]
        lines.append([r.case] + [_ms(r.time(i)) for i in impls]
                     + ["<br>".join(ratios) or "—", "<br>".join(verdict(b, r) for b in bars_for(r))])
    return _table(header, lines)


def _pair_table(rows: list[Row], pair: list[str], ratio_label: str) -> list[str]:
    """images/s of two implementations, pair = [base, new], and new's throughput against base's."""
    impls = [i for i in pair if any(i in r.impls for r in rows)]
    header = ["case"] + [f"{i} img/s" for i in impls] + [ratio_label]
    lines = [[r.case] + [_f(r.get(i, "images_per_s"), "{:.0f}") for i in impls]
             + [_x(throughput_ratio(r, pair[1], pair[0]))] for r in rows]
    return _table(header, lines)


def train_loop_table(rows: list[Row]) -> list[str]:
    return _pair_table(rows, LOOP_IMPLS, "after vs before")


def cpu_recipe_table(rows: list[Row]) -> list[str]:
    return _pair_table(rows, CPU_RECIPE_IMPLS, "cpu preset vs 32/64/64")


def bar_summary(families: dict[str, list[Row]], device: str) -> list[str]:
    lines = []
    for bar in BARS:
        if not device.startswith(bar.device):
            continue
        rows = [r for r in families.get(bar.family, []) if bar in bars_for(r)]
        results = [(r, *bar.check(r)) for r in rows]
        measured = [(r, v, met) for r, v, met in results if met is not None]
        if not measured:
            lines.append(f"- NOT MEASURED: {bar.topic}: {bar.text} {bar.short()} (no figure in this run; "
                         f"see the skipped benchmarks below)")
            continue
        for r, v, met in measured:
            lines.append(f"- {'MET' if met else 'MISSED'}: {bar.topic}: {bar.text} {bar.short()}: "
                         f"**{v:.2f}{bar.unit}** ({r.case})")
    return lines


def render(run: dict, note: str | None = None) -> str:
    info = (run.get("machine_info") or {}).get("ddpm_bench", {})
    families = rows_by_family(run)
    device = "cuda" if info.get("gpu") else "cpu"
    title = info.get("gpu") or f"CPU, {info.get('cpu_threads', '?')} threads"
    out = [f"# Benchmarks: {title}", "",
           f"Date {info.get('date', run.get('datetime', '?'))}; torch {info.get('torch', '?')}, "
           f"triton {info.get('triton', '?')}, CUDA {info.get('cuda', '?')}, Python {info.get('python', '?')}.",
           ""]
    if info.get("gpu"):
        out += [f"fp32 settings: cuDNN TF32 {'on' if info.get('cudnn_allow_tf32') else 'off'}, matmul TF32 "
                f"{'on' if info.get('matmul_allow_tf32') else 'off'} (PyTorch defaults; fp32 convolutions use "
                f"TF32 tensor cores when on).", ""]
    if note:
        out += [note, ""]
    out += ["Speed-ups are time(other) / time(fused) measured in the same run (> 1: fused is faster). "
            "Medians after warm-up; the timer of each figure is in the JSON (`extra_info.timer`). "
            "Bars are the project's fixed targets (benches/report.py), checked as stated, never adjusted.", ""]
    if any((f.get("pct_of_ceiling") or 0) > 100 for rows in families.values() for r in rows for f in r.impls.values()):
        out += ["A % of ceiling above 100 means the inputs fit in a cache: the copy ceiling is measured on "
                "a buffer several times the last-level cache.", ""]
    for name, c in (info.get("ceilings") or {}).items():
        out += [f"Ceilings measured in this run on {c['device']}: copy {c['copy_gbps']:.1f} GB/s "
                f"(bytes read + written), {c['matmul_dtype']} matmul {c['matmul_tflops']:.3g} TFLOP/s "
                f"({c['matmul_size']}³).", ""]
    out += ["## Bars", ""] + (bar_summary(families, device) or ["- none apply on this device"]) + [""]
    for family, table in (("kernel", kernel_table), ("step", kernel_table), ("train", train_table),
                          ("train_loop", train_loop_table), ("cpu_recipe", cpu_recipe_table),
                          ("sampling", sampling_table), ("noise", noise_table)):
        if families.get(family):
            out += [f"## {FAMILY_TITLES[family]}", ""] + table(families[family]) + [""]
    formulas = sorted({(r.info.get("op", r.case.split()[0]), r.info.get("bytes_formula") or r.info.get("flops_formula"))
                       for rows in families.values() for r in rows
                       if r.info.get("bytes_formula") or r.info.get("flops_formula")})
    if formulas:
        out += ["Bytes or FLOPs per call (the fewest a fused pass moves or computes):", ""]
        out += [f"- {op}: {formula}" for op, formula in formulas] + [""]
    skipped = run.get("ddpm_bench_skipped") or []
    if skipped:
        reasons: dict[str, int] = {}
        for s in skipped:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        out += ["## Skipped", ""] + [f"- {n} × {reason}" for reason, n in sorted(reasons.items())] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# chart


def render_png(run: dict, path: Path) -> None:
    families = rows_by_family(run)
    panels = []
    kern = families.get("kernel", []) + families.get("step", [])
    if kern:
        panels.append(("kernels and sampling step: speed-up of fused", kern,
                       [("vs eager", lambda r: speedup(r, "fused", "eager")),
                        ("vs torch.compile", lambda r: speedup(r, "fused", "compile"))]))
    loops = families.get("train", []) + families.get("sampling", [])
    if loops:
        panels.append(("training and sampling: images/s vs eager", loops,
                       [(f"{i} vs {_sampling_base(i)}",
                         (lambda i: lambda r: throughput_ratio(r, i, _sampling_base(i)))(i))
                        for i in ["fused", "fused step", "graphs", "fused+graphs", "compile", "fused+compile",
                                  "sample() fused", "sample() fused step"]]))
    if not panels:
        panels.append(("no comparable figures in this run", [], []))
    heights = [max(2.0, 0.32 * max(len(p[1]), 1) + 1.2) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (title, rows, series) in zip(axes[:, 0], panels):
        series = [(label, fn) for label, fn in series if any(fn(r) for r in rows)]
        width = 0.8 / max(len(series), 1)
        for k, (label, fn) in enumerate(series):
            ys = [i + k * width for i in range(len(rows))]
            ax.barh(ys, [fn(r) or float("nan") for r in rows], height=width, label=label)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(rows))], [r.case for r in rows], fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        values = [fn(r) for _, fn in series for r in rows if fn(r)]
        if values:
            # Log scale: speed-ups span from below 1 to orders of magnitude. Bars grow from a left edge
            # well under the smallest value, so a ratio just under 1 does not read as a long bar.
            ax.set_xscale("log")
            ax.set_xlim(left=min(0.5, min(values) / 2), right=max(2.0, max(values) * 1.5))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("× (same run; 1 = parity)")
        if series:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s), merged in order")
    parser.add_argument("--out", type=Path, required=True, help="markdown report to write")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the merged JSON here")
    parser.add_argument("--png", type=Path, default=None, help="also draw the speed-up chart here")
    parser.add_argument("--note", default=None, help="a line placed under the header (e.g. machine load)")
    args = parser.parse_args(argv)
    inputs = {p.resolve() for p in args.json}
    for target in (args.out, args.json_out, args.png):
        if target is not None and target.resolve() in inputs:
            raise UserError(f"{str(target)!r} is one of the input files; choose another output path")
    run = load_runs(args.json)
    if not run["benchmarks"]:
        raise UserError("the benchmark JSON holds no benchmarks")
    text = render(run, args.note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps(run, indent=1) + "\n")
    if args.png:
        render_png(run, args.png)
    print(f"wrote {args.out}" + (f", {args.png}" if args.png else ""))


if __name__ == "__main__":
    run_main(main)
