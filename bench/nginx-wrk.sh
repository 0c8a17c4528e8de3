#!/usr/bin/env bash
# Throughput cost of logging in nginx: wrk on loopback against one nginx worker answering
# `return 204`, four ways, alternated round by round so drift and noise hit all alike:
#   none       no logging at all
#   logtally   the logtally module, 5 fields
#   combined   access_log in the combined format, unbuffered (nginx's default)
#   json       access_log, JSON format, buffer=64k flush=1s
#   baseline   (only with BASELINE_MODULE=<.so>) the logtally configuration with another
#              build of the module, e.g. the one before a change: before/after in one run
# Prints per-round numbers, then medians, the ratio to "none", and the worker's CPU time per
# request (from /proc: utime+stime of the worker process, its writer thread included).
#
# MEASURE=instructions instead runs each configuration once, in one nginx process under
# valgrind's callgrind, and prints the user-space instructions it executed per request
# (writer thread included; the kernel's share, the same TCP work for all, is not counted):
# a count that other load on the machine cannot change, where time per request can swing
# by a third on a busy box.
#
# Usage: bench/nginx-wrk.sh            (needs the Route A module: scripts/nginx-build.sh module)
# With 2+ CPUs the worker is pinned to CPU 1 and wrk to CPU 0 (PIN=0 turns that off), so the
# worker, not wrk, is what saturates.
# Env:   ROUNDS=5 DURATION=5 CONNECTIONS=32 THREADS=1 PORT=18090 PIN=1
#        NGINX=/usr/sbin/nginx MODULE=target/release/libngx_http_logtally_module.so
#        BASELINE_MODULE=<another build of the module .so> (adds the "baseline" configuration)
#        MEASURE=time|instructions
#        CONFIGS="none logtally json" (a subset, in this order; default: all)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-5}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-1}"
PIN="${PIN:-1}"
[[ $(nproc) -ge 2 ]] || PIN=0
affinity=""
wrk_cmd=(wrk)
if [[ "$PIN" == 1 ]]; then
    affinity="worker_cpu_affinity 10;"
    wrk_cmd=(taskset -c 0 wrk)
fi
PORT="${PORT:-18090}"
NGINX="${NGINX:-/usr/sbin/nginx}"
MODULE="${MODULE:-$root/target/release/libngx_http_logtally_module.so}"
BASELINE_MODULE="${BASELINE_MODULE:-}"
MEASURE="${MEASURE:-time}"
processes="worker_processes 1;"
if [[ "$MEASURE" == instructions ]]; then
    command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
    # valgrind follows one process: the single-process mode (init_process runs there too).
    processes="master_process off;"
    affinity=""
fi
configs=(none logtally combined json)
if [[ -n "$BASELINE_MODULE" ]]; then
    [[ -f "$BASELINE_MODULE" ]] || { echo "no module at $BASELINE_MODULE" >&2; exit 1; }
    configs+=(baseline)
fi
if [[ -n "${CONFIGS:-}" ]]; then
    read -r -a configs <<<"$CONFIGS"
fi
# The ratios below are to these two.
[[ " ${configs[*]} " == *" none "* && " ${configs[*]} " == *" json "* ]] \
    || { echo "CONFIGS must include none and json" >&2; exit 1; }

command -v wrk >/dev/null || { echo "wrk is not installed" >&2; exit 1; }
[[ -f "$MODULE" ]] || { echo "no module at $MODULE: run scripts/nginx-build.sh module" >&2; exit 1; }

work="$(mktemp -d /tmp/logtally-bench.XXXXXX)"
chmod 755 "$work"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -QUIT "$p" 2>/dev/null || true; done
    sleep 0.5
    rm -rf "$work"
}
trap cleanup EXIT

http_block() {
    local name=$1 dir=$2
    case "$name" in
        none) echo "access_log off;" ;;
        logtally | baseline) cat <<CONF
access_log off;
logtally_spool $dir/spool;
logtally on;
logtally_field ad \$arg_ad;
logtally_field ev \$arg_ev;
logtally_field status \$status;
logtally_field rt \$request_time;
logtally_field ua \$http_user_agent;
CONF
        ;;
        combined) echo "access_log $dir/access.log combined;" ;;
        json) cat <<CONF
log_format bench_json escape=json '{"ad":"\$arg_ad","ev":"\$arg_ev","status":"\$status","rt":"\$request_time","ua":"\$http_user_agent"}';
access_log $dir/access.json bench_json buffer=64k flush=1s;
CONF
        ;;
    esac
}

# One nginx (1 worker) per configuration, on consecutive ports; idle ones cost nothing.
i=0
declare -A port_of worker_of
for name in "${configs[@]}"; do
    dir="$work/$name"
    mkdir -p "$dir/tmp"
    port=$((PORT + i))
    port_of[$name]=$port
    module=$MODULE
    [[ "$name" == baseline ]] && module=$BASELINE_MODULE
    cat >"$dir/nginx.conf" <<CONF
load_module $module;
$processes
$affinity
daemon off;
error_log $dir/error.log notice;
pid $dir/nginx.pid;
events { worker_connections 4096; }
http {
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    $(http_block "$name" "$dir")
    server {
        listen 127.0.0.1:$port;
        keepalive_requests 1000000;
        location / { return 204; }
        location = /status { access_log off; logtally off; logtally_status; }
    }
}
CONF
    if [[ "$MEASURE" != instructions ]]; then
        "$NGINX" -p "$dir" -c "$dir/nginx.conf" &
        pids+=($!)
    fi
    i=$((i + 1))
done

url_path='/e?ad=7&ev=view&cmp=spring'
wait_ready() {
    for _ in $(seq 600); do
        curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0
        sleep 0.05
    done
    echo "nginx on port $1 did not answer" >&2
    exit 1
}

if [[ "$MEASURE" == instructions ]]; then
    declare -A ir_per
    echo "user-space instructions per request (callgrind), duration=${DURATION}s connections=$CONNECTIONS"
    for name in "${configs[@]}"; do
        dir="$work/$name"
        valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
            "$NGINX" -p "$dir" -c "$dir/nginx.conf" >"$dir/valgrind.log" 2>&1 &
        vg=$!
        pids+=("$vg")
        wait_ready "${port_of[$name]}"
        # Count only the requests below: not start-up, configuration or the first request.
        callgrind_control -z "$vg" >/dev/null 2>&1
        out=$("${wrk_cmd[@]}" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -H 'User-Agent: logtally-bench/1.0' \
            "http://127.0.0.1:${port_of[$name]}$url_path")
        callgrind_control -d "$vg" >/dev/null 2>&1
        kill -QUIT "$vg"
        wait "$vg" || true
        reqs=$(awk '/requests in/ {print $1}' <<<"$out")
        ir=$(awk '/^summary:/ {print $2}' "$dir"/callgrind.out.1)
        ir_per[$name]=$((ir / reqs))
        printf '%-10s %10s requests %14s instructions %8s per request\n' "$name" "$reqs" "$ir" "${ir_per[$name]}"
    done
    echo
    printf '%-10s %16s %12s %12s\n' config "instr/request" "- none" "vs json"
    for name in "${configs[@]}"; do
        printf '%-10s %16s %12s %12.3f\n' "$name" "${ir_per[$name]}" "$((ir_per[$name] - ir_per[none]))" \
            "$(awk -v a="$((ir_per[$name] - ir_per[none]))" -v b="$((ir_per[json] - ir_per[none]))" 'BEGIN {print (b ? a / b : 0)}')"
    done
    exit 0
fi

for name in "${configs[@]}"; do
    wait_ready "${port_of[$name]}"
    master=$(cat "$work/$name/nginx.pid")
    worker_of[$name]=$(pgrep -P "$master" | head -n1)
done

clk=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

declare -A rps_list cpu_list rps_of cpu_of rps_vs_json cpu_vs_json
echo "rounds=$ROUNDS duration=${DURATION}s connections=$CONNECTIONS wrk_threads=$THREADS pinned=$PIN nginx=$("$NGINX" -v 2>&1 | sed 's,.*/,,')"
printf '%-6s %-10s %12s %14s\n' round config req/s "worker_us/req"
for round in $(seq "$ROUNDS"); do
    for name in "${configs[@]}"; do
        w=${worker_of[$name]}
        before=$(cpu_ticks "$w")
        out=$("${wrk_cmd[@]}" -t"$THREADS" -c"$CONNECTIONS" -d"${DURATION}s" -H 'User-Agent: logtally-bench/1.0' \
            "http://127.0.0.1:${port_of[$name]}$url_path")
        after=$(cpu_ticks "$w")
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        reqs=$(awk '/requests in/ {print $1}' <<<"$out")
        us=$(awk -v d=$((after - before)) -v c="$clk" -v n="$reqs" 'BEGIN { printf "%.2f", d / c * 1e6 / n }')
        rps_list[$name]+="$rps "
        cpu_list[$name]+="$us "
        rps_of[$name]=$rps
        cpu_of[$name]=$us
        printf '%-6s %-10s %12.0f %14s\n' "$round" "$name" "$rps" "$us"
    done
    # Per-round ratios to the buffered JSON access_log: the round's neighbours share its noise.
    for name in logtally baseline; do
        [[ -n "${rps_of[$name]:-}" ]] || continue
        rps_vs_json[$name]+="$(awk -v a="${rps_of[$name]}" -v b="${rps_of[json]}" 'BEGIN {print a / b}') "
        cpu_vs_json[$name]+="$(awk -v a="${cpu_of[$name]}" -v b="${cpu_of[json]}" 'BEGIN {print a / b}') "
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
base=$(median <<<"${rps_list[none]}")
echo
printf '%-34s %12s %8s %14s\n' "configuration (medians)" "req/s" "ratio" "worker_us/req"
for name in "${configs[@]}"; do
    case "$name" in
        none) label="no logging" ;;
        logtally) label="logtally, 5 fields" ;;
        combined) label="access_log combined, unbuffered" ;;
        json) label="access_log json, buffer=64k" ;;
        baseline) label="logtally, BASELINE_MODULE" ;;
    esac
    m=$(median <<<"${rps_list[$name]}")
    c=$(median <<<"${cpu_list[$name]}")
    printf '%-34s %12.0f %8.3f %14s\n' "$label" "$m" "$(awk -v a="$m" -v b="$base" 'BEGIN {print a / b}')" "$c"
done
echo
printf '%-34s %16s %16s\n' "vs json access_log (median of rounds)" "req/s ratio" "worker_us ratio"
for name in logtally baseline; do
    [[ -n "${rps_vs_json[$name]:-}" ]] || continue
    printf '%-34s %16.3f %16.3f\n' "$name" "$(median <<<"${rps_vs_json[$name]}")" "$(median <<<"${cpu_vs_json[$name]}")"
done
echo
for name in logtally baseline; do
    [[ -n "${port_of[$name]:-}" ]] || continue
    status=$(curl -fs "http://127.0.0.1:${port_of[$name]}/status")
    echo "$name: $(grep -E '^logtally_module_(events|dropped)_total' <<<"$status" | tr '\n' ' ')"
done
