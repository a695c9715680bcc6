# One Dockerfile, two images, each in a published and a local variant:
#   docker build --target operator -t explorer-operator:0.1.0 .
#   docker build --target runtime  -t explorer-runtime:0.1.0 .   (coordinator, CPU workers and vLLM engines)
# Bases are pinned to exact versions; final stages carry no compilers or pip caches and run as a non-root user.
# No `# syntax=` line: BuildKit's built-in frontend is used, so a build never fetches a frontend image.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
# The local variants' base (kubeplane passes its own Debian base made with mmdebstrap instead).
ARG LOCAL_BASE_IMAGE=debian:12.12-slim

# ---- build: one wheel of this project -------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY explorer ./explorer
COPY operator ./operator
COPY controlplane/kubeplane ./controlplane/kubeplane
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- operator: a virtualenv with the operator extra only (no torch, no Ray) -------------------------------
FROM ${PYTHON_IMAGE} AS operator-venv
COPY --from=wheel /wheels /wheels
COPY requirements/operator.lock.txt /tmp/operator.lock.txt
# Dependencies from the hash-pinned lock (scripts/lock.sh), then our own wheel without resolving anything.
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r /tmp/operator.lock.txt \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps /wheels/rft_explorer-*.whl \
 && /opt/venv/bin/pip uninstall -y pip setuptools wheel

FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="explorer-operator" \
      org.opencontainers.image.source="https://github.com/rft-explorer/rft-explorer"
COPY --from=operator-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "explorer_operator"]
CMD ["--all-namespaces"]

# ---- runtime: vLLM's CUDA image plus this project's runtime extra -----------------------------------------
FROM ${VLLM_IMAGE} AS runtime
COPY --from=wheel /wheels /wheels
# vLLM's image already has torch and vLLM; add Ray and our package into its interpreter, then drop the wheels.
# Not from a lock: the runtime lock pins the CPU stack, and a lock for this image needs its own freeze (docs).
RUN python3 -m pip install --no-cache-dir "$(ls /wheels/rft_explorer-*.whl)[runtime]" \
 && rm -rf /wheels \
 && useradd --uid 1000 --create-home --shell /usr/sbin/nologin explorer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1
USER 1000:1000
WORKDIR /home/explorer
# The operator sets each pod's command: `python3 -m explorer coordinator ...` for the coordinator,
# `python3 -m vllm.entrypoints.openai.api_server ...` for engines, `ray start ...` for CPU workers.
ENTRYPOINT []
CMD ["python3", "-m", "explorer", "--help"]

# ---- local variants: the images of the local plane's real nodes, built with no registry and no network --------
# `kubeplane images` (controlplane/kubeplane/images.py) builds these with BuildKit. LOCAL_BASE_IMAGE is a Debian
# base made with mmdebstrap and passed as an oci-layout context; the named context `pyenv` is a virtualenv tree
# (bin/python -> /usr/bin/python3, site-packages laid out by uv from the pins scripts/install.sh uses). Only COPY:
# no container runs while building. By hand:
#   docker buildx build --target runtime-cpu --build-arg LOCAL_BASE_IMAGE=debian:bookworm \
#     --build-context pyenv=<venv tree> .
FROM ${LOCAL_BASE_IMAGE} AS local-python
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp

FROM local-python AS operator-local
# The numeric users have no passwd entry: libraries asking getpass for a user name read these first.
ENV USER=explorer-operator LOGNAME=explorer-operator
COPY --from=pyenv / /opt/venv/
COPY explorer /opt/venv/lib/python3.11/site-packages/explorer
COPY operator/explorer_operator /opt/venv/lib/python3.11/site-packages/explorer_operator
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "explorer_operator"]
CMD ["--all-namespaces"]

FROM local-python AS runtime-cpu
COPY --from=pyenv / /opt/venv/
COPY explorer /opt/venv/lib/python3.11/site-packages/explorer
COPY operator/explorer_operator /opt/venv/lib/python3.11/site-packages/explorer_operator
# vLLM's CPU sampler is torch.compile'd and inductor needs a C++ compiler, which this image does not ship: eager.
ENV HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 USER=explorer LOGNAME=explorer TORCHDYNAMO_DISABLE=1
USER 1000:1000
WORKDIR /tmp
ENTRYPOINT []
CMD ["python3", "-m", "explorer", "--help"]
