# kernel-bridge as a container image: one replica per container. Replicas share PostgreSQL
# (KB_DATABASE_URL) and a storage root mounted at /data (deploy/README.md).
#
#   docker build -t kernel-bridge .
#   docker run --privileged -p 8002:8002 -v kb-data:/data kernel-bridge
#
# The sandbox needs privileges a default container does not have (deploy/README.md, "Privileges"):
# bubblewrap makes user and mount namespaces, the server delegates a cgroup v2 subtree to each
# kernel, and each session's /home/work is a loop-mounted ext4 image.

# -- build: the web console's editor and the API docs' assets come from npm ----------------------
FROM debian:bookworm-slim AS assets
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends make nodejs npm ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile ./
COPY api/console/ api/console/
RUN make console docs-assets BIN=/nonexistent

# -- run ------------------------------------------------------------------------------------------
FROM debian:bookworm-slim
ARG TOOLCHAINS="gcc g++ make golang-go ruby nodejs default-jdk-headless rustc"
# python3 serves; bubblewrap, libseccomp2 and e2fsprogs are the sandbox (bridge/sandbox.py,
# bridge/seccomp.py, bridge/disk.py); the toolchains are the languages' (bridge/languages.py).
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv bubblewrap \
      libseccomp2 e2fsprogs util-linux ca-certificates ${TOOLCHAINS} \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api/ api/
COPY bridge/ bridge/
COPY kernelspecs/ kernelspecs/
COPY --from=assets /src/api/console/editor.js api/console/editor.js
COPY --from=assets /src/api/docs_assets/ api/docs_assets/
RUN python3 -m venv .venv \
 && .venv/bin/pip install --no-cache-dir -q . \
 && .venv/bin/kernel-bridge kernelspecs install --sys-prefix >/dev/null
ENV PATH=/app/.venv/bin:$PATH \
    KB_HOST=0.0.0.0 \
    KB_PORT=8002 \
    KB_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8002
# Root in the container: the server drops each kernel to KB_SANDBOX_UID inside bubblewrap, and
# mounting session filesystems needs it (SECURITY.md).
HEALTHCHECK --interval=10s --timeout=3s \
  CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8002/healthz', timeout=2)"]
ENTRYPOINT ["kernel-bridge", "serve"]
