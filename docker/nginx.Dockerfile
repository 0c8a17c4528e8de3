# nginx (Debian 12's 1.22.1) with the logtally module, built against the same nginx version
# and configure flags as the runtime image: both stages install nginx from bookworm, and the
# module is built by scripts/nginx-build.sh (Route A), exactly as the tests build it.
#   docker build -f docker/nginx.Dockerfile -t logtally-nginx .
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx nginx-dev libclang-dev pkg-config dpkg-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/nginx-build.sh module

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/spool/logtally
COPY --from=build /src/target/release/libngx_http_logtally_module.so /usr/lib/nginx/modules/
COPY nginx-conf/docker.conf /etc/nginx/nginx.conf
RUN nginx -t
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
