# The BYOC agent as a container (the EKS sidecar: deploy/kubernetes/). Non-root, read-only
# root filesystem friendly (state on a volume), no shell needed at run time.
FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY agent ./agent
COPY control_plane_stub ./control_plane_stub
COPY certs ./certs
COPY byoc_demo ./byoc_demo
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
