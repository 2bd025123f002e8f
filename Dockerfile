# The BYOC agent as a container (deploy/kubernetes/standalone/ or sidecar/). It runs as 10001
# with a read-only root filesystem: it writes only to its volumes (/var/lib/byoc-agent: key,
# certificate, state, audit log; /run/byoc-agent: control socket; /tmp), never to the image
# (no bytecode caches). tests/test_pod_enrollment.py runs the agent that way.
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
# The agent alone: not the stub control plane, its PKI tool or the demo workload (setup.py
# declares the commands of the packages that are there), nor the stub's dependencies.
COPY pyproject.toml setup.py constraints.txt README.md LICENSE ./
COPY agent ./agent
RUN python -m venv /opt/byoc-agent \
    && /opt/byoc-agent/bin/pip install --no-cache-dir -c constraints.txt ".[fast]"

FROM python:3.11.7-slim-bookworm
COPY --from=build /opt/byoc-agent /opt/byoc-agent
RUN groupadd --system --gid 10001 byoc-agent \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin byoc-agent
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/byoc-agent/bin:$PATH
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["/opt/byoc-agent/bin/byoc-agent"]
CMD ["run", "--config", "/etc/byoc-agent/agent.toml"]
