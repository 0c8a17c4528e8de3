#!/bin/sh
# Builds the nginx image's file system from the libnginx-mod-http-logtally package in
# /tmp/image (both targets of docker/nginx.Dockerfile run this): apt pulls in Debian's
# nginx; stock nginx.conf, logs to the container's output, the site docker/nginx-site.conf.
set -eu
export DEBIAN_FRONTEND=noninteractive
# No service starts inside an image build.
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
apt-get update -qq
apt-get install -y -qq --no-install-recommends /tmp/image/libnginx-mod-http-logtally_*.deb
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/sbin/policy-rc.d
ln -sf /dev/stdout /var/log/nginx/access.log
ln -sf /dev/stderr /var/log/nginx/error.log
rm -f /etc/nginx/sites-enabled/default
install -m 0644 /tmp/image/nginx-site.conf /etc/nginx/sites-enabled/logtally
# The permission model of docs/deployment.md: the workers' group owns the spool.
install -d -o www-data -g www-data -m 0770 /var/spool/logtally
nginx -t
rm -rf /tmp/image
