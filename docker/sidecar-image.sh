#!/bin/sh
# Builds the sidecar image's file system from the logtally package in /tmp/image (both
# targets of docker/sidecar.Dockerfile run this). The user logtally gets a fixed uid/gid
# (900) first, so Kubernetes can check runAsNonRoot and name it in securityContext; the
# package's postinst keeps an existing user and adds it to the group www-data (gid 33,
# Debian's static id), which owns the spool.
set -eu
export DEBIAN_FRONTEND=noninteractive
addgroup --quiet --system --gid 900 logtally
adduser --quiet --system --uid 900 --ingroup logtally --no-create-home \
    --home /var/lib/logtally --gecos "logtally sidecar" logtally
apt-get update -qq
apt-get install -y -qq --no-install-recommends /tmp/image/logtally_*.deb
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
install -m 0640 -o root -g logtally /tmp/image/logtally.toml /etc/logtally/logtally.toml
/usr/bin/logtally --version
rm -rf /tmp/image
