# The ant_ray image for Ray clusters: KubeRay (jobs/kuberay-rayjob.yaml) and the cluster launcher (jobs/cluster.yaml).
# Ray's official GPU image of the pinned Ray (constraints/ci.txt: ray==2.60.0) on Python 3.11, plus ant_ray and its
# pinned dependencies, PyTorch included (Ray's images ship without it).
#
#   docker build -t ant-ray:0.1.0 .
#   docker tag ant-ray:0.1.0 REGISTRY/ant-ray:0.1.0 && docker push REGISTRY/ant-ray:0.1.0
#
# The development machines have no Docker engine: this file has never been built there. CI lints it with hadolint
# (tests/test_deploy_files.py). Keep the tag's Ray version equal to constraints/ci.txt's, or pip will replace the
# image's Ray with another one.
FROM rayproject/ray:2.60.0-py311-gpu

# The image's own non-root user `ray` (uid 1000, gid 100 `users`; numeric, so that a host or a Kubernetes
# runAsNonRoot check can resolve it): its Python in /home/ray/anaconda3 is writable by it, and KubeRay and the cluster
# launcher run `ray start` as it. No ENTRYPOINT or CMD here: those two start Ray in the container with a command of
# their own, which an ENTRYPOINT would swallow; the base image's defaults stay as they are.
USER 1000:100
WORKDIR /home/ray/ant_ray
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

# torch first, in a layer of its own: it is most of the image and changes only with constraints/ci.txt, so code
# changes rebuild in seconds. The x86_64 wheels of this torch release are CUDA builds.
COPY --chown=1000:100 constraints ./constraints
RUN pip install -c constraints/ci.txt torch torchvision

# Not editable: the image holds an installed copy of the package. search_spaces/ and jobs/ come along so that
# `ray job submit` entry points also run without --working-dir (the RayJob in jobs/kuberay-rayjob.yaml does).
# `python -I` leaves this folder off sys.path: the import check sees the installed package.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 ant_ray ./ant_ray
COPY --chown=1000:100 search_spaces ./search_spaces
COPY --chown=1000:100 jobs ./jobs
RUN pip install -c constraints/ci.txt . \
    && python -I -c "import ant_ray, ray, torch"
