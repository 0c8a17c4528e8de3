#!/usr/bin/env bash
# Builds the two Debian packages into target/debian/:
#   libnginx-mod-http-logtally_<version>_<arch>.deb   the nginx module, laid out like
#                                                     Debian's own libnginx-mod-* packages
#   logtally_<version>_<arch>.deb                     the sidecar, its conffile, its
#                                                     systemd unit and its system user
#
#   scripts/package.sh                builds the module (Route A, against the installed
#                                     Debian nginx) and the sidecar, then packages them
#   scripts/package.sh --no-build     packages what target/release already holds
#   scripts/package.sh logtally       only the named package(s) (the sidecar alone needs
#                                     no nginx)
#   LOGTALLY_DEB_VERSION=0.1.0-2 ...  the packages' version (default <Cargo.toml version>-1)
#   LOGTALLY_DEB_OUT=DIR ...          write the .deb files there instead of target/debian
#
# dpkg-deb, not cargo-deb: it is part of dpkg (nothing to download), and the module
# package needs maintainer scripts, links and an ABI dependency that only look like
# Debian's when written the way dh_nginx writes them. The package sources are in
# packaging/debian/<package>/ (control template, maintainer scripts, files).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$root/packaging/debian"
out="${LOGTALLY_DEB_OUT:-$root/target/debian}"
stage="$out/stage"
cd "$root"

build=1
want_module=0
want_sidecar=0
for arg in "$@"; do
  case "$arg" in
    --no-build) build=0 ;;
    libnginx-mod-http-logtally) want_module=1 ;;
    logtally) want_sidecar=1 ;;
    *) echo "usage: $0 [--no-build] [libnginx-mod-http-logtally] [logtally]" >&2; exit 2 ;;
  esac
done
if [[ $want_module == 0 && $want_sidecar == 0 ]]; then
  want_module=1
  want_sidecar=1
fi

die() { echo "package.sh: $*" >&2; exit 1; }

for tool in dpkg-deb dpkg-shlibdeps strip; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install dpkg-dev binutils)"
done
[ -d "${HOME:-/root}/.cargo/bin" ] && PATH="${HOME:-/root}/.cargo/bin:$PATH"
if [[ $want_module == 1 ]]; then
  # The ABI the module is built for is the one the installed nginx provides.
  abi="$(dpkg-query -W -f='${Provides}' nginx 2>/dev/null | tr ',' '\n' | tr -d ' ' | grep '^nginx-abi-' || true)"
  [[ -n "$abi" ]] || die "the installed nginx provides no nginx-abi-*: install Debian's nginx and nginx-dev"
  nginx_dev="$(dpkg-query -W -f='${Version}' nginx-dev 2>/dev/null || true)"
  nginx_ver="$(dpkg-query -W -f='${Version}' nginx)"
  [[ "$nginx_dev" == "$nginx_ver" ]] \
    || die "nginx-dev ($nginx_dev) and nginx ($nginx_ver) differ: the module must be built from the installed nginx's own source"
  module_so="$root/target/release/libngx_http_logtally_module.so"
  if [[ $build == 1 ]]; then
    eval "$(scripts/nginx-build.sh prepare)"
    scripts/nginx-build.sh module
  fi
  [[ -f "$module_so" ]] || die "$module_so missing (scripts/nginx-build.sh module)"
fi
if [[ $want_sidecar == 1 ]]; then
  sidecar_bin="$root/target/release/logtally"
  if [[ $build == 1 ]]; then
    cargo build --release -p logtally
  fi
  [[ -f "$sidecar_bin" ]] || die "$sidecar_bin missing (cargo build --release -p logtally)"
fi

cargo_version="$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)"
version="${LOGTALLY_DEB_VERSION:-${cargo_version}-1}"
arch="$(dpkg --print-architecture)"
maintainer="${DEBFULLNAME:-logtally maintainers} <${DEBEMAIL:-logtally@example.org}>"
# Reproducible file times: the last commit's.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

rm -rf "$stage"
mkdir -p "$stage" "$out"

# doc_files <package> <stage>: copyright, a changelog and the docs, as Debian ships them.
doc_files() {
  local doc="$2/usr/share/doc/$1"
  install -d "$doc"
  cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: logtally
Source: the logtally source tree (scripts/package.sh)

Files: *
Copyright: $(date -u -d "@$SOURCE_DATE_EPOCH" +%Y) the logtally authors
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF
  {
    echo "$1 ($version) unstable; urgency=medium"
    echo
    echo "  * Built by scripts/package.sh from $(git rev-parse --short HEAD 2>/dev/null || echo 'a source tree')."
    echo
    echo " -- $maintainer  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
  } | gzip -9n >"$doc/changelog.Debian.gz"
  install -m 0644 "$root/docs/reference.md" "$root/docs/deployment.md" "$doc/"
}

# shlibs_of <binary>: the Depends dpkg-shlibdeps computes (it wants a debian/control).
shlibs_of() {
  local tmp
  tmp="$(mktemp -d)"
  mkdir "$tmp/debian"
  printf 'Source: logtally\n\nPackage: logtally\nArchitecture: any\n' >"$tmp/debian/control"
  (cd "$tmp" && dpkg-shlibdeps -O "$1" 2>/dev/null) | sed -n 's/^shlibs:Depends=//p'
  rm -rf "$tmp"
}

# build_deb <package> <stage> <binary>: control from its template, md5sums, dpkg-deb.
build_deb() {
  local pkg="$1" dir="$2" bin="$3" f size shlibs
  install -d -m 0755 "$dir/DEBIAN"
  for f in postinst prerm postrm; do
    install -m 0755 "$src/$pkg/$f" "$dir/DEBIAN/$f"
  done
  [[ -f "$src/$pkg/conffiles" ]] && install -m 0644 "$src/$pkg/conffiles" "$dir/DEBIAN/conffiles"
  size="$(du -sk --exclude=DEBIAN "$dir" | cut -f1)"
  shlibs="$(shlibs_of "$bin")"
  [[ -n "$shlibs" ]] || die "dpkg-shlibdeps found no dependencies for $bin"
  sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
      -e "s|@INSTALLED_SIZE@|$size|" -e "s|@NGINX_ABI@|${abi:-}|" -e "s|@SHLIBS@|$shlibs|" \
      "$src/$pkg/control" >"$dir/DEBIAN/control"
  (cd "$dir" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
     | xargs -0 md5sum) >"$dir/DEBIAN/md5sums"
  chmod 0644 "$dir/DEBIAN/md5sums"
  rm -f "$out/${pkg}_"*"_$arch.deb"
  dpkg-deb --root-owner-group -Zxz --build "$dir" "$out/${pkg}_${version}_${arch}.deb" >/dev/null
  echo "built $out/${pkg}_${version}_${arch}.deb"
}

# --- libnginx-mod-http-logtally: Debian's module layout ---
if [[ $want_module == 1 ]]; then
  m="$stage/libnginx-mod-http-logtally"
  install -d "$m/usr/lib/nginx/modules" "$m/usr/share/nginx/modules-available" "$m/usr/share/nginx/logtally"
  # Stripped the way dh_strip strips shared libraries.
  strip --remove-section=.comment --remove-section=.note --strip-unneeded \
    -o "$m/usr/lib/nginx/modules/ngx_http_logtally_module.so" "$module_so"
  chmod 0644 "$m/usr/lib/nginx/modules/ngx_http_logtally_module.so"
  install -m 0644 "$src/libnginx-mod-http-logtally/mod-http-logtally.conf" "$m/usr/share/nginx/modules-available/"
  install -m 0644 "$src/libnginx-mod-http-logtally/logtally.conf" "$m/usr/share/nginx/logtally/"
  doc_files libnginx-mod-http-logtally "$m"
  build_deb libnginx-mod-http-logtally "$m" "$m/usr/lib/nginx/modules/ngx_http_logtally_module.so"
fi

# --- logtally: the sidecar ---
if [[ $want_sidecar == 1 ]]; then
  s="$stage/logtally"
  install -d "$s/usr/bin" "$s/etc/logtally" "$s/lib/systemd/system" "$s/var/lib/logtally" "$s/var/spool/logtally"
  strip --remove-section=.comment --remove-section=.note -o "$s/usr/bin/logtally" "$sidecar_bin"
  chmod 0755 "$s/usr/bin/logtally"
  install -m 0644 "$src/logtally/logtally.toml" "$s/etc/logtally/"
  install -m 0644 "$src/logtally/logtally.service" "$s/lib/systemd/system/"
  doc_files logtally "$s"
  build_deb logtally "$s" "$s/usr/bin/logtally"
fi

rm -rf "$stage"
