#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (CI has no GPU; run this on a machine with one, from anywhere):
#   1. the engine's tests marked `gpu`: greedy tokens equal `generate` on CUDA (fp32, bf16, batched), the compiled
#      decode step equal to the eager one there;
#   2. bench/decode.py on CUDA: the decode step at 1 and 16 rows, eager vs --compile (bf16);
#   3. bench/train.py --gpu: QLoRA SFT of a ~0.5B model on CUDA, padded vs padding-free, step time and peak memory.
# Everything it prints goes to the terminal and to $LOG (default: gpu-check-<date>.log in the current folder); copy
# the figures into bench/README.md with the GPU's name.
#
#   bench/gpu.sh                      # with .venv/bin/python (make install; a CUDA build of torch)
#   PYTHON=python3 bench/gpu.sh
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
log="${LOG:-$PWD/gpu-check-$(date +%Y%m%d-%H%M%S).log}"
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch ' + torch.__version__)" || exit 2
status=0
run() {            # one step: its output to the terminal and the log; a failure is remembered, the next steps run
    echo "\$ $*" | tee -a "$log"
    (cd "$here" && "$@") 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
}
run "$py" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
run "$py" -m pytest -q -m gpu tests/server/engine/test_gpu.py
run "$py" bench/decode.py --device cuda --arms bf16 bf16+compile --rows 1 16
run "$py" bench/train.py --gpu
echo "log: $log"
exit $status
