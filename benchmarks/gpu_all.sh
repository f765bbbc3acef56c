#!/usr/bin/env bash
# Everything a GPU session should check and time, in one device call (each step has a timeout so the
# whole fits the 600 s per-call limit; rerun a step alone if it timed out):
#   bash benchmarks/gpu_all.sh            (results also land in $OUT when the device tool sets it)
# The GPU machine has torch, triton, transformers, scikit-learn, pytest(-benchmark) and peft but no
# package index: the package is installed without dependencies. The tables write
# benchmarks/results/<table>_<device>.{json,md} (GPU name, versions, date); the new files are copied
# to $OUT: commit them from there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
pip install --no-deps --no-build-isolation -q -e . >"$OUT/install.log" 2>&1 || echo "install failed: see install.log"
echo "== GPU tests (kernels compiled for real, no interpreter)"
timeout 240 python -m pytest tests/test_lora.py tests/test_lora_kernels.py tests/test_gmm_kernel.py tests/test_mixture.py \
    -q -p no:cacheprovider >"$OUT/gpu_tests.log" 2>&1; echo "   exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
echo "== layer table";   timeout 120 python benchmarks/lora_table.py >"$OUT/lora_table.log" 2>&1; echo "   exit $?"
echo "== mixture table"; timeout 60 python benchmarks/mixture_table.py >"$OUT/mixture_table.log" 2>&1; echo "   exit $?"
echo "== epoch table";   timeout 120 python benchmarks/epoch_table.py --models minilm bert-base --lengths 64 128 \
    >"$OUT/epoch_table.log" 2>&1; echo "   exit $?"
find benchmarks/results -type f -newer "$OUT/versions.txt" -exec cp {} "$OUT/" \;
ls "$OUT"
