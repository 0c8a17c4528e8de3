#!/usr/bin/env bash
# Builds the logtally nginx module, by either route of NGINX-BUILD.md.
#
#   scripts/nginx-build.sh prepare     configure the stock Debian nginx source (Route A) into
#                                      .build/nginx-src; prints NGINX_SOURCE_DIR/NGINX_BUILD_DIR
#   scripts/nginx-build.sh env         prints those two variables (after prepare), for eval
#   scripts/nginx-build.sh module      Route A: prepare + cargo build --release -p logtally-ngx
#                                      → target/release/libngx_http_logtally_module.so
#                                        (loads into the Debian /usr/sbin/nginx 1.22.1)
#   scripts/nginx-build.sh vendored    Route B: cargo build --release -p logtally-ngx
#                                      --features vendored into target/vendored, copies the
#                                      nginx 1.28 it built to .build/nginx-1.28/sbin/nginx and
#                                      the module to .build/nginx-1.28/modules/
#
# Idempotent: `prepare` only reconfigures when the copied tree or its configure output is
# missing. Needs the packages nginx-dev libclang-dev (Route A) and libpcre2-dev libssl-dev
# zlib1g-dev (Route B). Never set NGX_VERSION & co: Route B must not download anything.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/.build"
src="$build/nginx-src"
debian_src=/usr/share/nginx/src

prepare() {
    if [[ -f "$src/objs/ngx_auto_config.h" && -f "$src/.logtally-configured" ]]; then
        return 0
    fi
    [[ -d "$debian_src" ]] || { echo "nginx-dev is not installed ($debian_src missing)" >&2; exit 1; }
    rm -rf "$src"
    mkdir -p "$build"
    # configure writes into the folder it runs in: work on a copy of the packaged tree.
    cp -a "$debian_src" "$src"
    (
        cd "$src"
        # shellcheck disable=SC1091
        . ./conf_flags
        # Debian's own flags (as debhelper's nginx_mod build system passes them), so the
        # module's binary-compatibility signature matches /usr/sbin/nginx.
        ./configure \
            --with-cc-opt="$(dpkg-buildflags --get CFLAGS) -fPIC $(dpkg-buildflags --get CPPFLAGS)" \
            --with-ld-opt="$(dpkg-buildflags --get LDFLAGS) -fPIC" \
            "${NGX_CONF_FLAGS[@]}" >"$build/nginx-configure.log" 2>&1 \
            || { tail -n 30 "$build/nginx-configure.log" >&2; exit 1; }
    )
    touch "$src/.logtally-configured"
}

print_env() {
    echo "export NGINX_SOURCE_DIR=$src"
    echo "export NGINX_BUILD_DIR=$src/objs"
}

case "${1:-prepare}" in
    prepare)
        prepare
        print_env
        ;;
    env)
        print_env
        ;;
    module)
        prepare
        cd "$root"
        NGINX_SOURCE_DIR="$src" NGINX_BUILD_DIR="$src/objs" \
            cargo build --release -p logtally-ngx
        echo "built $root/target/release/libngx_http_logtally_module.so (Route A, Debian nginx $(/usr/sbin/nginx -v 2>&1 | sed 's,.*/,,'))"
        ;;
    vendored)
        cd "$root"
        # A separate target dir: the vendored nginx-sys bindings must not replace Route A's.
        # Without NGINX_*_DIR: when set (e.g. after `eval "$(... prepare)"`), nginx-sys
        # would take Route A's tree even with the vendored feature.
        env -u NGINX_SOURCE_DIR -u NGINX_BUILD_DIR CARGO_TARGET_DIR="$root/target/vendored" \
            cargo build --release -p logtally-ngx --features vendored
        out="$(ls -td "$root"/target/vendored/release/build/nginx-sys-*/out/objs/nginx 2>/dev/null | head -n1)"
        [[ -x "$out" ]] || { echo "vendored nginx binary not found under target/vendored" >&2; exit 1; }
        dest="$build/nginx-1.28"
        mkdir -p "$dest/sbin" "$dest/modules"
        install -m 0755 "$out" "$dest/sbin/nginx"
        install -m 0644 "$root/target/vendored/release/libngx_http_logtally_module.so" "$dest/modules/"
        echo "built $dest/sbin/nginx ($("$dest/sbin/nginx" -v 2>&1 | sed 's,.*/,,')) and $dest/modules/libngx_http_logtally_module.so (Route B)"
        ;;
    *)
        echo "usage: $0 [prepare|env|module|vendored]" >&2
        exit 2
        ;;
esac
