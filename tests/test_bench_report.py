"""benches/report.py on a small hand-made pytest-benchmark JSON: ratios, bars (MET / MISSED / NOT
MEASURED), the merged JSON, the chart, and clear errors for bad input. No timing happens here."""
from __future__ import annotations

import json

import pytest

from benches import report


def _bench(name, family, case, impl, time_ms, device="cuda", **info):
    extra = dict(family=family, case=case, impl=impl, time_ms=time_ms, device=device, **info)
    # stats.median (seconds) deliberately disagrees with time_ms: the report must use time_ms.
    return {"name": name, "extra_info": extra, "stats": {"median": 1.0}}


def _run() -> dict:
    gn = dict(op="gn_fwd", dtype="bf16", size="large")
    benches = [
        # GN forward, large bf16: 3.0× eager (MET ≥ 3), 1.1× compile (MISSED ≥ 1.2), 80 % of copy (MET ≥ 75).
        _bench("gn-eager", "kernel", "GN fwd large", "eager", 3.0, **gn),
        _bench("gn-compile", "kernel", "GN fwd large", "compile", 1.1, **gn),
        _bench("gn-fused", "kernel", "GN fwd large", "fused", 1.0, gbps=3200.0, pct_of_ceiling=80.0,
               ceiling="copy GB/s", **gn),
        # Training, mnist bf16: 1.2× images/s (MISSED ≥ 1.3), VRAM 0.5 (MET ≤ 0.8).
        _bench("tr-eager", "train", "train mnist bf16 b128", "eager", 10.0, preset="mnist", dtype="bf16",
               batch=128, images_per_s=1000.0, peak_vram_mib=2000.0, launches_per_step=1210.0,
               kernels_per_step=1200.0),
        _bench("tr-fused", "train", "train mnist bf16 b128", "fused", 8.0, preset="mnist", dtype="bf16",
               batch=128, images_per_s=1200.0, peak_vram_mib=1000.0),
        # CUDA graphs: 2.5× eager's images/s, one launch for the step's kernels.
        _bench("tr-graphs", "train", "train mnist bf16 b128", "graphs", 4.0, preset="mnist", dtype="bf16",
               batch=128, images_per_s=2500.0, peak_vram_mib=2100.0, launches_per_step=1.0, kernels_per_step=1190.0),
        # A CPU row: checked inline against the sampling step's CPU bar (the row's device decides), but that bar
        # is not in the summary of a CUDA report.
        _bench("st-eager", "step", "ddim b256", "eager", 2.0, device="cpu", size="MNIST b256"),
        _bench("st-fused", "step", "ddim b256", "fused", 0.5, device="cpu", size="MNIST b256"),
        # Sampling, DDIM-50 batch 64: 2.5× (MET ≥ 2); the shipped sampler is compared with its own eager run.
        _bench("sa-eager", "sampling", "DDIM-50 b64", "eager", 100.0, sampler="DDIM-50", batch=64, images_per_s=100.0),
        _bench("sa-fused", "sampling", "DDIM-50 b64", "fused", 40.0, sampler="DDIM-50", batch=64, images_per_s=250.0),
        _bench("sa-s-eager", "sampling", "DDIM-50 b64", "sample() eager", 200.0, sampler="DDIM-50", batch=64,
               images_per_s=50.0),
        _bench("sa-s-fused", "sampling", "DDIM-50 b64", "sample() fused", 100.0, sampler="DDIM-50", batch=64,
               images_per_s=75.0),
        # Not labelled for the report (e.g. an older benchmark): ignored.
        {"name": "unlabelled", "extra_info": {}, "stats": {"median": 0.1}},
    ]
    return {"benchmarks": benches, "datetime": "2026-01-01T00:00:00",
            "machine_info": {"ddpm_bench": {"gpu": "Test GPU", "torch": "9.9", "triton": "9.9", "cuda": "99",
                                            "date": "2026-01-01", "ceilings": {}}},
            "ddpm_bench_skipped": [{"test": "x", "reason": "kernels/flash_attention/op.py not present"}]}


def _rows(run):
    return {r.case: r for rows in report.rows_by_family(run).values() for r in rows}


def test_ratios_are_time_of_other_over_time_of_fused():
    rows = _rows(_run())
    gn = rows["GN fwd large"]
    assert report.speedup(gn, "fused", "eager") == pytest.approx(3.0)
    assert report.speedup(gn, "fused", "compile") == pytest.approx(1.1)
    assert report.speedup(gn, "fused", "sdpa") is None  # not measured: no ratio invented
    train = rows["train mnist bf16 b128"]
    assert report.throughput_ratio(train, "fused", "eager") == pytest.approx(1.2)
    assert report.throughput_ratio(train, "fused", "eager", "peak_vram_mib") == pytest.approx(0.5)
    assert report.throughput_ratio(train, "graphs", "eager") == pytest.approx(2.5)
    assert "unlabelled" not in rows


def test_bars_show_met_and_missed_next_to_figures():
    text = report.render(_run())
    gn_line = next(line for line in text.splitlines() if line.startswith("| GN fwd large"))
    assert "3.00×" in gn_line and "1.10×" in gn_line
    assert "≥ 3×: 3.00× MET" in gn_line
    assert "≥ 1.2×: 1.10× MISSED" in gn_line
    assert "≥ 75 %: 80.00 % MET" in gn_line
    train_line = next(line for line in text.splitlines() if line.startswith("| train mnist bf16 b128"))
    assert "≥ 1.3×: 1.20× MISSED" in train_line
    assert "≤ 0.8×: 0.50× MET" in train_line
    train_header = text.split("## Training step")[1].splitlines()[2]
    assert "graphs img/s" in train_header and "graphs vs eager" in train_header and "compile" not in train_header
    assert "| 2.50× |" in train_line  # graphs vs eager
    assert "eager: 1210 / 1200<br>graphs: 1 / 1190" in train_line  # launches / kernels per step; fused unmeasured
    summary = text.split("## Bars")[1].split("##")[0]
    assert "MISSED: loops: mnist training, fused kernels + bf16 vs eager bf16 (images/s) ≥ 1.3×: **1.20×**" in summary
    assert "MET: loops: DDIM-50 at batch 64, fused (kernels + step) vs eager (images/s) ≥ 2×: **2.50×**" in summary
    sampling_lines = text.split("## Sampling")[1].splitlines()
    header = sampling_lines[2]
    assert "sample() fused vs sample() eager" in header and "sample() eager vs" not in header
    row = next(line for line in sampling_lines if line.startswith("| DDIM-50 b64"))
    assert "| 2.50× |" in row and "| 1.50× |" in row  # fused vs eager; sample() fused vs sample() eager
    # Bars of this device with no figure in the run are listed, never silently dropped.
    assert "NOT MEASURED: kernels: attention forward+backward, fused vs eager" in summary
    # The sampling step's CPU bar is not a bar of this (CUDA) report.
    assert "on CPU (2 cores)" not in summary
    assert "1 × kernels/flash_attention/op.py not present" in text
    assert "Test GPU" in text and "torch 9.9" in text


def test_cli_writes_markdown_json_and_png(tmp_path):
    src = tmp_path / "run.json"
    src.write_text(json.dumps(_run()))
    md, merged, png = tmp_path / "out.md", tmp_path / "merged.json", tmp_path / "out.png"
    report.main([str(src), str(src), "--out", str(md), "--json-out", str(merged), "--png", str(png),
                 "--note", "shared machine"])
    assert "shared machine" in md.read_text()
    assert len(json.loads(merged.read_text())["benchmarks"]) == 2 * len(_run()["benchmarks"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content", ["not json", json.dumps({"benchmarks": "no"}), json.dumps([1])])
def test_bad_json_is_one_clear_error(tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as exc:
        report.run_main(report.main, [str(bad), "--out", str(tmp_path / "o.md")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pytest-benchmark JSON" in err
    assert not (tmp_path / "o.md").exists()


def test_missing_file_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.run_main(report.main, [str(tmp_path / "nope.json"), "--out", str(tmp_path / "o.md")])
    assert "does not exist" in capsys.readouterr().err


def test_output_never_overwrites_an_input(tmp_path, capsys):
    src = tmp_path / "run.json"
    original = json.dumps(_run())
    src.write_text(original)
    with pytest.raises(SystemExit):
        report.run_main(report.main, [str(src), "--out", str(tmp_path / "o.md"), "--json-out", str(src)])
    assert "one of the input files" in capsys.readouterr().err
    assert src.read_text() == original
