#!/bin/sh
# The GPU check (benchmarks/gpu_check.py): one GPU, <= 8 minutes; pass --dry-run to check it on the CPU.
cd "$(dirname "$0")/.." && exec python benchmarks/gpu_check.py "$@"
