# Stand-in for python:3.11-slim: Debian bookworm's Python 3.11, pip, and a wheelhouse of
# exactly the pinned packages (constraints.txt) that pip installs from: no index, no network.
ARG ROOTFS_IMAGE
FROM ${ROOTFS_IMAGE}
COPY wheels /wheels
# python:3.11-slim has no `sandbox` user (the sandbox Dockerfile creates it), has `python` and
# a pip that installs into /usr/local as root.
RUN userdel sandbox \
    && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
    && python3 "$(ls /wheels/pip-*.whl)/pip" install -q --no-index --find-links /wheels pip \
    && ln -s /usr/bin/python3 /usr/local/bin/python
ENV LANG=C.UTF-8 PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels
CMD ["python3"]
