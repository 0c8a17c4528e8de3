#!/usr/bin/env bash
# The fault campaign (issue 10): one stream of known requests through real nginx with the
# module, the real sidecar and a temporary PostgreSQL, while faults are injected: kill -9s
# of the sidecar at random moments, nginx reloads, a corrupted sealed segment, a binary
# upgrade (USR2, WINCH, QUIT), PostgreSQL stopped, the spool's (tmpfs) disk full. Prints
# one table (sent, stored, dropped with reasons, doubled, catch-up time after each fault)
# and exits non-zero when the counts disagree. The campaign is the ignored e2e test
# `chaos::campaign` (tests/tests/suite/chaos.rs).
#
#   scripts/chaos.sh            long form: 100 kill -9s, 20 reloads, PostgreSQL down 60 s (~3.5 min)
#   scripts/chaos.sh --short    short form (CI): 10 kill -9s, 3 reloads, PostgreSQL down 10 s (~1 min)
#   LOGTALLY_CHAOS_SEED=N ...   replay the random moments of an earlier run (it prints its seed)
#   --no-build                  use the module and sidecar already built
#
# Needs root (the tmpfs for the full disk; without it that fault is skipped, loudly).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
form=long
build=1
for arg in "$@"; do
  case "$arg" in
    --short) form=short ;;
    --long) form=long ;;
    --no-build) build=0 ;;
    *) echo "chaos.sh: unknown argument $arg (--short, --long, --no-build)" >&2; exit 2 ;;
  esac
done
[ -d "${HOME:-/root}/.cargo/bin" ] && PATH="${HOME:-/root}/.cargo/bin:$PATH"
eval "$(scripts/nginx-build.sh prepare)"
if [ "$build" = 1 ]; then
  scripts/nginx-build.sh module
  cargo build --release -p logtally
fi
export LOGTALLY_BIN="$root/target/release/logtally"
echo "chaos.sh: $form form ($(date +%T))"
LOGTALLY_CHAOS="$form" cargo test --release -p logtally-e2e --test suite chaos::campaign \
  -- --ignored --exact --nocapture
