# The logtally sidecar, installed from the logtally package (its binary, user and
# folders; no systemd in a container: the image runs the binary directly, as the unit's
# user logtally, uid/gid 900, member of www-data, gid 33). Two ways to get the package:
#
#   podman build -f docker/sidecar.Dockerfile --target host -t logtally-sidecar .
#       takes target/debian/logtally_*.deb that scripts/package.sh built on this machine
#   docker build -f docker/sidecar.Dockerfile -t logtally-sidecar .
#       (default target) builds it from source in rust:1-bookworm (no nginx needed)
#
# The configuration is docker/logtally.toml; compose and Kubernetes mount their own at
# /etc/logtally/logtally.toml.
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS host
COPY target/debian/logtally_*.deb docker/sidecar-image.sh docker/logtally.toml /tmp/image/
RUN sh /tmp/image/sidecar-image.sh
USER 900
EXPOSE 9187
# The final flush: commits what was read, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/logtally"]
CMD ["run", "-c", "/etc/logtally/logtally.toml"]

FROM docker.io/library/rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends dpkg-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/package.sh logtally

FROM ${DEBIAN_IMAGE} AS runtime
COPY --from=build /src/target/debian/logtally_*.deb /tmp/image/
COPY docker/sidecar-image.sh docker/logtally.toml /tmp/image/
RUN sh /tmp/image/sidecar-image.sh
USER 900
EXPOSE 9187
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/logtally"]
CMD ["run", "-c", "/etc/logtally/logtally.toml"]
