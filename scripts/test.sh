#!/usr/bin/env bash
# Runs every logtally test: builds the nginx module by both routes (stock Debian nginx 1.22.1
# and ngx's vendored nginx 1.28) and the sidecar, then `cargo test` over the workspace, whose
# integration tests start real nginx, PostgreSQL and Prometheus processes of their own.
#
#   scripts/test.sh                  everything
#   scripts/test.sh -- <filter>      pass arguments on to `cargo test`
#   LOGTALLY_SKIP_VENDORED=1 ...     skip Route B (nginx 1.28) to save ~2 minutes
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# Say what is missing, all at once, with the line that installs it.
missing=()
need_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || missing+=("$1"); }
for p in nginx nginx-dev libclang-dev dpkg-dev libpcre2-dev libssl-dev zlib1g-dev postgresql-15 prometheus; do
  need_pkg "$p"
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: missing Debian packages: ${missing[*]}" >&2
  echo "test.sh: install them with: apt-get install -y ${missing[*]}" >&2
  exit 1
fi
# rustup's cargo, also when the caller's PATH lacks it (CI runs with a plain environment).
[ -d "${HOME:-/root}/.cargo/bin" ] && PATH="${HOME:-/root}/.cargo/bin:$PATH"
command -v cargo >/dev/null || { echo "test.sh: cargo not found (install Rust with rustup)" >&2; exit 1; }

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "module, Route A: stock Debian nginx"
eval "$(scripts/nginx-build.sh prepare)"     # exports NGINX_SOURCE_DIR / NGINX_BUILD_DIR
scripts/nginx-build.sh module

step "sidecar"
cargo build --release -p logtally

if [ "${LOGTALLY_SKIP_VENDORED:-0}" != 1 ]; then
  step "module, Route B: vendored nginx 1.28"
  scripts/nginx-build.sh vendored
fi

export LOGTALLY_BIN="$root/target/release/logtally"

step "cargo test (release)"
args=()
if [ "${1:-}" = "--" ]; then shift; args=("$@"); fi
cargo test --release --workspace -- "${args[@]}"

if [ "${LOGTALLY_SKIP_VENDORED:-0}" != 1 ] && [ ${#args[@]} -eq 0 ]; then
  step "module tests again, against the vendored nginx 1.28 (Route B)"
  LOGTALLY_NGINX_ROUTE=vendored cargo test --release -p logtally-e2e --test suite -- module::
fi
