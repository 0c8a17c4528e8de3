# nginx (Debian 12's 1.22.1) with the logtally module, installed from the
# libnginx-mod-http-logtally package exactly as on a Debian machine (apt pulls in nginx;
# stock nginx.conf; the package's modules-enabled and conf.d links), plus the site
# docker/nginx-site.conf. Two ways to get the package:
#
#   podman build -f docker/nginx.Dockerfile --target host -t logtally-nginx .
#       takes target/debian/libnginx-mod-http-logtally_*.deb that scripts/package.sh
#       built on this machine: no registry needed beyond a debian:bookworm-slim image
#       (scripts/containers-test.sh makes one with debootstrap)
#   docker build -f docker/nginx.Dockerfile -t logtally-nginx .
#       (default target) builds the package from source in rust:1-bookworm with
#       scripts/package.sh, against the same Debian nginx the runtime installs
ARG DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS host
COPY target/debian/libnginx-mod-http-logtally_*.deb docker/nginx-image.sh docker/nginx-site.conf /tmp/image/
RUN sh /tmp/image/nginx-image.sh
EXPOSE 80
# Graceful: workers finish their requests, drain their queue and seal their segment.
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]

FROM docker.io/library/rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx nginx-dev libclang-dev pkg-config dpkg-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/package.sh libnginx-mod-http-logtally

FROM ${DEBIAN_IMAGE} AS runtime
COPY --from=build /src/target/debian/libnginx-mod-http-logtally_*.deb /tmp/image/
COPY docker/nginx-image.sh docker/nginx-site.conf /tmp/image/
RUN sh /tmp/image/nginx-image.sh
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
