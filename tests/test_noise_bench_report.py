"""benches/report.py's tables for per-sample noise (family "noise") and the training loop (family
"train_loop") on hand-made pytest-benchmark JSON: the cost ratio to torch.randn, the ≤ 1.5× bar, and
the loop's after / before images/s. No timing happens here."""
from __future__ import annotations

from benches import report


def _bench(family, case, impl, time_ms, device="cpu", **info):
    return {"name": f"{case}-{impl}", "stats": {"median": 1.0},
            "extra_info": dict(family=family, case=case, impl=impl, time_ms=time_ms, device=device, **info)}


def _run(op_ms: float) -> dict:
    noise = "per-sample noise 1024×3×32×32 fp32"
    step = "DDPM step with noise 1024×3×32×32 fp32"
    benches = [
        _bench("noise", noise, "torch.randn", 20.0, op="per_sample_noise"),
        _bench("noise", noise, "op", op_ms, op="per_sample_noise"),
        _bench("noise", noise, "eager reference", 1300.0, op="per_sample_noise"),
        _bench("noise", step, "op noise + fused step", 40.0, op="ddpm_step_noise"),
        _bench("noise", step, "fused step, in-kernel noise", 30.0, op="ddpm_step_noise"),
        _bench("train_loop", "train loop tiny fp32 batch 64", "before", 100.0, images_per_s=400.0),
        _bench("train_loop", "train loop tiny fp32 batch 64", "after", 80.0, images_per_s=500.0),
    ]
    return {"benchmarks": benches, "datetime": "2026-01-01T00:00:00",
            "machine_info": {"ddpm_bench": {"cpu_threads": 2, "date": "2026-01-01", "ceilings": {}}}}


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def test_noise_table_gives_each_cost_in_units_of_the_first_column():
    text = report.render(_run(op_ms=25.0))
    table = _section(text, report.FAMILY_TITLES["noise"])
    noise_row = next(line for line in table.splitlines() if line.startswith("| per-sample noise"))
    assert "op: 1.25×" in noise_row and "eager reference: 65.00×" in noise_row
    assert "≤ 1.5×: 1.25× MET" in noise_row
    step_row = next(line for line in table.splitlines() if line.startswith("| DDPM step"))
    assert "fused step, in-kernel noise: 0.75×" in step_row and "MET" not in step_row
    assert "- MET: noise: per-sample noise 1024×3×32×32, op time / one torch.randn ≤ 1.5×: **1.25×**" in text


def test_noise_bar_is_missed_above_one_and_a_half():
    text = report.render(_run(op_ms=31.0))
    assert "- MISSED: noise: per-sample noise 1024×3×32×32, op time / one torch.randn ≤ 1.5×: **1.55×**" in text


def test_train_loop_table_gives_after_over_before():
    table = _section(report.render(_run(op_ms=25.0)), report.FAMILY_TITLES["train_loop"])
    assert "| train loop tiny fp32 batch 64 | 400 | 500 | 1.25× |" in table
