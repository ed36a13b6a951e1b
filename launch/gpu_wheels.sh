#!/usr/bin/env bash
# Downloads into .whl/ the wheels that launch/gpu_benchmark.sh installs on a GPU machine
# that has JAX, flax, optax, orbax and torch but not the rest of requirements.txt, and no
# network: Python 3.12, x86-64 Linux. Run it from the repository root where pip works;
# the versions are requirements.txt's (portpicker: what grain needs at import).
set -euo pipefail
py=${PYTHON_VERSION:-3.12}
pins=$(grep -E '^(grain|array-record|ml-collections|simplejpeg|tensorboardX)==' requirements.txt)
mkdir -p .whl
# shellcheck disable=SC2086  # one argument per pin
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl $pins portpicker==1.6.0
ls -l .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
