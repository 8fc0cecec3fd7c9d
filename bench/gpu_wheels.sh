#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels bench/gpu.sh installs on a GPU machine that cannot reach PyPI.
# The lent GPU machine has Python 3.12 with its own torch, numpy, scipy, pillow, prometheus-client and pytest;
# it lacks the DICOM, ZeroMQ and file-watching packages the agent needs. They go to .whl/ (git-ignored), which
# the device call carries. Run from the repository root: bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in pydicom==3.0.2 pyzmq==27.1.0 watchdog==6.0.0 pynetdicom==3.0.4; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
ls .whl
