"""The phases of scripts/gpu_bench.py, one module each, in the order they run.

    setup.py          install the project, build and load the C++/CUDA sampling-step extension
    kernel_tests.py   the CUDA kernel tests and the CUDA parity tests (the raw op's bad-tensors test alone)
    train.py          the main job as a user runs it, stopped by SIGINT when its share is spent
    evaluate.py       judge accuracy, FD and its floor at w = 1 and w = 3, and the digit grid
    sampling.py       DDIM-50 and DDPM-1000 images/s
    cifar.py          CIFAR-10 end to end: train, judge test accuracy, accuracy and FD/floor at w = 1 and 3
    train_compare.py  the same training eager, with CUDA graphs, --fused-kernels, both and --compile, at
                      batches 128 and 512: images/s, peak GPU memory, launches and kernels per step
    benches.py        pytest benches within the phase's time (BENCH_DEADLINE)
    report.py         quality.json and the benchmark report <gpu>.md/.json/.png

Each module's `run(s, rec, deadline, results)` is the phase: `s` the run's Settings, `rec` the Recorder
(gpu_bench.log, phases.json), `deadline` a time.monotonic() value it must finish by, `results` the dict
that becomes quality.json. A phase raises PhaseFailed or PhaseSkipped (common.py) to say how it ended.
The time shares are in scripts/gpu_bench.py, beside the order.
"""
