# The diagnostic call of the first GPU run (see README.md), from the repository root, with OUT set:
#   OUT=<dir> bash benches/results/h200-2026-11-30/diagnose.sh
export PYTHONUNBUFFERED=1
T0=$(date +%s)
MAX_JOBS=16 timeout 75 python -m pip install -q --no-build-isolation --no-deps -e . > $OUT/pip.log 2>&1; echo "pip rc $? $(( $(date +%s)-T0 )) s"
timeout 40 python benches/results/h200-2026-11-30/diagnose.py philox 2>&1 | grep -v Warning; echo "philox rc $? $(( $(date +%s)-T0 )) s"
timeout 30 python -X faulthandler benches/results/h200-2026-11-30/diagnose.py reject 2>&1 | head -40; echo "reject $(( $(date +%s)-T0 )) s"
timeout 40 python benches/results/h200-2026-11-30/diagnose.py model 2>&1 | grep -v Warning | tail -8; echo "model $(( $(date +%s)-T0 )) s"
timeout $(( 215 - ($(date +%s)-T0) )) python -m pytest -q -p no:cacheprovider -rfE -x -k "cuda and not rejects_bad_tensors" tests/test_noise_op.py tests/test_sampling_step_noise.py tests/test_sampling_step_ext.py tests/kernels --ignore=tests/kernels/test_compile_targets.py > $OUT/pytest.log 2>&1; echo "pytest rc $? $(( $(date +%s)-T0 )) s"; tail -25 $OUT/pytest.log
