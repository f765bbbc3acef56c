#!/usr/bin/env bash
# Everything a GPU session should check and time. Each step has a timeout; all of them together take
# longer than one 600 s device call (and a session gets 15 min of device time in all), so pick
# steps. Measured on an H100 (2026-11-26, ~30 s to start a machine per call): gpu_tests with
# GPU_TESTS="tests/test_lora_kernels.py tests/test_clear_loss.py" GPU_TESTS_ARGS="-k cuda" 48 s of
# tests, host_overhead ~30 s, epoch_table ~200 s, epoch_bf16 ~100 s (those four: 380 s in one call;
# since then epoch_table's epochs run three interleaved rounds instead of two back-to-back and every
# timed step follows an untimed one: expect epoch_table ~300 s, epoch_bf16 ~160 s, so gpu_tests +
# epoch_table + epoch_bf16 fill one call),
# lora_table + mixture_table ~130 s, probe_bf16 ~50 s; on an H200 kernel_sweep
# (SWEEP_ARGS="--fractions 1.0") ~60 s. Second H100 run (commit 21069ae, 2026-11-26 15:55): gpu_tests
# of the three kernel files 67 s of tests, + epoch_table + epoch_bf16: 490 s in one call; host_overhead
# + epoch_compiled (cut at its 200 s, MiniLM only, the steps then re-recording CUDA graphs): 230 s.
# Third H100 run (commit 1746f50, 2026-11-26 17:43): gpu_tests of tests/test_lora_kernels.py and
# tests/test_train.py (-k cuda) 68 s of tests + epoch_compiled: 312 s in one call; epoch_tf32 132 s;
# gpu_tests of the other files with CUDA tests 15 s + host_overhead_fp32: 48 s.
# step_profile (commit 514bba4) 115 s with the machine's start. The tables' commit field comes from the
# device's copy of .git, which can be older than the tree that ran: name the commit sent, e.g.
# BENCH_COMMIT=$(git rev-parse --short HEAD) written out in the device command (epoch_table.py and
# profile_step.py record it instead).
# Next plan: the layer changed after the third run (once_differentiable backward, the Router-mask
# length check, DeBERTa's shared-input path), so first, in one call:
#   BENCH_COMMIT=<sha> STEPS="gpu_tests epoch_compiled" GPU_TESTS="tests/test_lora_kernels.py tests/test_train.py tests/test_architectures.py" GPU_TESTS_ARGS="-k cuda" bash benchmarks/gpu_all.sh
# or a subset, e.g. STEPS="gpu_tests epoch_table" GPU_TESTS=tests/test_gmm_kernel.py (results also
# land in $OUT when the device tool sets it; a second call in one command needs its own OUT).
# The GPU machine has torch, triton, transformers, scikit-learn, pytest(-benchmark) and peft but no
# package index: the package runs from the source tree (PYTHONPATH), not installed. The tables write
# benchmarks/results/<table>_<device>.{json,md} (GPU name, versions, date). Logs and the new table
# files are packed into $OUT/gpu_all.tgz (the device tool returns at most 8 files): unpack it here
# and commit the tables from it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
LOG=$(mktemp -d)
mkdir -p "$OUT"
PY=python3  # the GPU image's python3 is the one with torch; a bare `python` may not exist there
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi >"$LOG/nvidia-smi.txt" 2>&1
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    | tee "$LOG/versions.txt"
# No install: pip there cannot fetch build dependencies (no index). Run from the source tree instead,
# with kernels/ linked where the package maps it (clear_fast.kernels); the link stays on that machine.
[ -e clear_fast/kernels ] || ln -s ../kernels clear_fast/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import clear_fast.kernels.gmm" || echo "clear_fast does not import: every step below will fail"

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $LOG/NAME.log, print its tail
    local name=$1 secs=$2; shift 2
    [[ " ${STEPS:-gpu_tests kernel_sweep host_overhead host_overhead_fp32 lora_table mixture_table epoch_table epoch_bf16 epoch_tf32 probe_bf16 step_profile epoch_compiled} " == *" $name "* ]] || return 0
    echo "== $name"
    timeout "$secs" "$@" >"$LOG/$name.log" 2>&1
    echo "   exit $?"
    tail -n "${TAIL:-6}" "$LOG/$name.log" | sed 's/^/   /'
    # pack after every step, so a call cut short still brings back what finished
    find benchmarks/results -type f -newer "$LOG/versions.txt" -exec cp {} "$LOG/" \;
    tar czf "$OUT/gpu_all.tgz" -C "$LOG" .
}
GPU_TESTS=${GPU_TESTS:-tests/test_lora.py tests/test_lora_kernels.py tests/test_clear_loss.py tests/test_gmm_kernel.py tests/test_mixture.py}
TAIL=15 step gpu_tests 150 $PY -m pytest $GPU_TESTS -q -p no:cacheprovider -rfE ${GPU_TESTS_ARGS:-}
# GPU time of the routed LoRA kernels per TileConfig (CONFIG in kernels/routed_lora.py should follow it)
step kernel_sweep 150 $PY benchmarks/lora_kernel_sweep.py ${SWEEP_ARGS:-}
# bf16 activations with fp32 adapters (autocast training), then fp32; --profile prints where the
# host time goes (torch.profiler tables, bare launcher cost) into the logs only
step host_overhead 90 $PY benchmarks/host_overhead.py --profile
step host_overhead_fp32 90 $PY benchmarks/host_overhead.py --dtype float32 --profile
step lora_table 90 $PY benchmarks/lora_table.py
# sklearn at N = 1e6 alone takes over a minute (7 repeats, two thread settings): measured up to 1e5;
# 5 repeats of 10 rows took over 60 s on an H200 (0.9 s of pauses per repeat)
step mixture_table 100 $PY benchmarks/mixture_table.py --repeats 5 --sklearn-max-n 100000
# 1280 samples (40 steps): at 640, epochs of 0.4-2 s scattered +-40 % on an H200 (launch-bound)
step epoch_table 360 $PY benchmarks/epoch_table.py --models minilm bert-base --lengths 64 128 --epoch-samples 1280
# the same under bf16 autocast (--bf16 on the CLI), at length 128; writes epoch_<device>_bf16.*
step epoch_bf16 220 $PY benchmarks/epoch_table.py --models minilm bert-base --lengths 128 --epoch-samples 1280 --bf16
# the same with TF32 fp32 products (--tf32 on the CLI), at length 128; writes epoch_<device>_tf32.*
step epoch_tf32 220 $PY benchmarks/epoch_table.py --models minilm bert-base --lengths 128 --epoch-samples 1280 --tf32
# where the bf16 clean-probability pass spends its time (torch.profiler; Triton recompiles)
step probe_bf16 120 $PY benchmarks/probe_bf16_pass.py
# where a step's time goes (host or GPU) and which ops clear-lora adds to plain LoRA's step
step step_profile 150 $PY benchmarks/profile_step.py --models minilm bert-base --lengths 128
# steps of compiled models (CUDA graphs): what a host-bound step costs without the host launching
# each kernel; writes epoch_<device>_compile_reduce-overhead.*
step epoch_compiled 300 $PY benchmarks/epoch_table.py --models minilm bert-base --lengths 128 --compile reduce-overhead
ls "$LOG"
