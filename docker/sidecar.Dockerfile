# The logtally sidecar. It needs no nginx to build: only the sidecar package is compiled.
#   docker build -f docker/sidecar.Dockerfile -t logtally-sidecar .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p logtally

FROM debian:bookworm-slim
COPY --from=build /src/target/release/logtally /usr/local/bin/logtally
COPY docker/logtally.toml /etc/logtally/logtally.toml
RUN mkdir -p /var/lib/logtally /var/spool/logtally
EXPOSE 9187
STOPSIGNAL SIGTERM
ENTRYPOINT ["logtally"]
CMD ["run", "-c", "/etc/logtally/logtally.toml"]
