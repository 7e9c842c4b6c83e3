#!/usr/bin/env bash
# ToMe on one GPU: ViT-B/16 and ViT-L/16 at 384 px in bfloat16 over r, against the PyTorch ToMe
# (timm's blocks with this repository's merge, on the same GPU), written to a Markdown file in
# docs/ that names the device. Run from the repository root on a machine with a CUDA GPU:
#
#     bash eval/gpu_benchmark.sh                  # -> docs/benchmark_gpu.md
#     PYTHON=python3 bash eval/gpu_benchmark.sh docs/benchmark_h100.md
#
# First it checks that the cuDNN attention path equals the reference formulation (the GPU-only
# tests of tests/test_attention.py); no figures are written if that fails. Then three tables:
# B/16 at batch 64 and batch 1 (latency), L/16 at batch 32. Expected to take well under 15
# minutes, most of it compiling the merged models.
set -euo pipefail

out=${1:-docs/benchmark_gpu.md}
python=${PYTHON:-python3}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# The tests default to the CPU (tests/conftest.py); this run is about the GPU.
export JAX_PLATFORMS=cuda
# JAX would take 75% of the GPU's memory up front, leaving torch too little.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

device=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
echo "device: $device"

"$python" -m pytest -q tests/test_attention.py -k "cudnn" -rs

bench() {
    # Blank lines around each table's title and footnote make them Markdown paragraphs.
    "$python" -m eval.benchmark --image-size 384 --dtype bfloat16 --vs-torch \
        --runs 20 --warmup 3 "$@" | sed -e 's/^\(ViT-.*\)$/\1\n/' -e 's/^\(PyTorch ToMe:.*\)$/\n\1\n/'
}

tmp=$(mktemp)
{
    echo "# ToMe on $device: ours (JAX) against the PyTorch ToMe"
    echo
    echo "Measured by \`bash eval/gpu_benchmark.sh\` on $(date -u +%Y-%m-%d):"
    echo "$("$python" -c 'import jax, torch; print(f"jax {jax.__version__}, torch {torch.__version__}")')."
    echo "Each table: \`python -m eval.benchmark --image-size 384 --dtype bfloat16 --vs-torch"
    echo "--runs 20 --warmup 3\` with the case and schedules shown; random weights; attention:"
    echo "$("$python" -c 'import jax.numpy as jnp; from tome_jax import attention as a; print(a.resolve("auto", jnp.bfloat16, 64))')"
    echo "(\`tome_jax.attention\`). Speed-ups are against each side's r = 0 row."
    echo
    bench --case B/16:64 B/16:1 --r 0 8 13 16 23
    bench --case L/16:32 --r 0 8 16 23
} | tee "$tmp"
mv "$tmp" "$out"
echo "wrote $out"
