# Shared by the benchmarks that run fazt nodes on this machine (scripts/bench-peers,
# scripts/bench-mesh): building the binary, one temporary directory, starting, joining and
# stopping servers, and how busy the machine was. Sourced from the repository's root after
# `set -euo pipefail`, with $bench set to the script's name.
#
# After `bench_setup`: $fazt is the binary, $tmp the temporary directory (removed on exit
# unless BENCH_KEEP=1), $tmp/logs holds every server's stdout and stderr, and the servers
# started with start_node are stopped on exit or interrupt.

say() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "$bench" "$*" >&2; exit 1; }

# The observer (scripts/lib/observe.py) watches databases, HTTP ports and /proc from outside.
observe() { python3 "$PWD/scripts/lib/observe.py" "$@"; }
# Runs an observer command that prints shell assignments, and makes them.
measure() {
    local out
    out=$(observe "$@") || die "measuring ($1) failed"
    eval "$out"
}

bench_setup() {
    command -v python3 >/dev/null || die "needs python3 (with its sqlite3 module) to observe databases"
    python3 -c 'import sqlite3' 2>/dev/null || die "python3 has no sqlite3 module"
    if [[ ${BENCH_SKIP_BUILD:-} != 1 ]]; then
        say "building fazt (release)"
        cargo build --release
    fi
    fazt=$PWD/target/release/fazt
    [[ -x $fazt ]] || die "no binary at $fazt: run cargo build --release"
    tmp=$(mktemp -d)
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$tmp/logs"
}

# --- servers -------------------------------------------------------------------------------
# server_pid: the fazt process of each running node (what is killed and measured in /proc);
# launch_pid: what this shell started and waits for (the same process, or strace around it).
declare -A server_pid=() launch_pid=()
cleanup() {
    local pid
    for pid in "${server_pid[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${launch_pid[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ ${BENCH_KEEP:-} == 1 ]]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi
}

db() { echo "$tmp/$1.db"; }
f() { # node args...: a fazt command on a node's database
    local node=$1
    shift
    "$fazt" --db "$(db "$node")" "$@"
}

# With trace_fsync=1, start_node runs each server under strace, which logs every fsync and
# fdatasync of the server to $tmp/logs/<node>.fsync. With --seccomp-bpf only those calls stop
# the server; every other system call runs at full speed.
trace_fsync=0
strace_fsync_ok() {
    command -v strace >/dev/null &&
        strace -f --seccomp-bpf -qq -e trace=fsync,fdatasync -o /dev/null true 2>/dev/null
}

# Starts a node's server on a free port (HTTP on TCP, peers on UDP, same number).
start_node() { # node
    local node=$1 attempt i pid child wrap=()
    if ((trace_fsync)); then
        wrap=(strace -f --seccomp-bpf -qq -e trace=fsync,fdatasync -e signal=none -o "$tmp/logs/$node.fsync")
    fi
    for attempt in 1 2 3; do
        "${wrap[@]}" "$fazt" --db "$(db "$node")" server start --port 0 >"$tmp/logs/$node.out" 2>"$tmp/logs/$node.err" &
        pid=$!
        for i in $(seq 1 100); do
            grep -q '^fazt serving' "$tmp/logs/$node.out" 2>/dev/null && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        if grep -q '^fazt serving' "$tmp/logs/$node.out" 2>/dev/null; then
            launch_pid[$node]=$pid
            if ((${#wrap[@]})); then
                child=$(cat "/proc/$pid/task/$pid/children" 2>/dev/null || pgrep -P "$pid" || true)
                child=${child%% *}
                [[ $(readlink "/proc/$child/exe" 2>/dev/null) == "$fazt" ]] ||
                    die "cannot find the server process of $node under strace (pid $pid)"
                server_pid[$node]=$child
            else
                server_pid[$node]=$pid
            fi
            return 0
        fi
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        # Port 0 picks a free TCP port; the same UDP number may be taken. Try another.
        grep -q 'already in use' "$tmp/logs/$node.err" || break
    done
    cat "$tmp/logs/$node.err" >&2
    die "the server of $node did not start"
}

# The HTTP port a running node printed when it started.
http_port() { # node
    sed -n 's|^fazt serving http://[^:]*:\([0-9]*\)/.*|\1|p' "$tmp/logs/$1.out" | head -n 1
}

# What servers log once nodes start stopping (their peers going away) is not worth showing:
# the summary shows each log only up to its mark.
declare -A log_mark=()
mark_logs() {
    local node
    for node in "${!server_pid[@]}"; do
        [[ -n ${log_mark[$node]:-} ]] || log_mark[$node]=$(wc -l <"$tmp/logs/$node.err")
    done
}

stop_node() { # node
    mark_logs
    kill "${server_pid[$1]}" 2>/dev/null || true
    wait "${launch_pid[$1]}" 2>/dev/null || true
    unset "server_pid[$1]" "launch_pid[$1]"
}

# $2 joins $1: both trust each other and $2 dials $1. $1's server must be running.
join() { # inviter joiner
    local ticket
    ticket=$(f "$1" peer invite 2>/dev/null | tail -n 1)
    f "$2" peer join "$ticket" --name "$1" --as "$2" >/dev/null ||
        die "$2 could not join $1"
}

# --- load ----------------------------------------------------------------------------------
# Two cores are shared with whatever else runs, here or on the host (steal time). Each phase
# reports how busy the machine was, how much of that was this benchmark (its servers and
# everything it ran), and how much the hypervisor stole. Ticks are 1/100 s.
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $9, $7 + $8 }' /proc/stat; }
own_ticks() { # sets $own: this shell, everything it waited for, and the servers still running
    local pid
    # Not in a command substitution: a subshell's `times` would not see this shell's children.
    times >"$tmp/times"
    own=$(awk -v hz="$hz" '{ for (i = 1; i <= NF; i++) { split($i, p, "m"); s += p[1] * 60 + p[2] } }
        END { printf "%d", s * hz }' "$tmp/times")
    for pid in "${server_pid[@]}"; do
        own=$((own + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
}
declare -A phase_start=() load=()
phase_begin() { # name
    local busy st irq
    own_ticks
    read -r busy st irq <<<"$(cpu_ticks)"
    phase_start[$1]="$busy $st $irq $own $EPOCHREALTIME"
}
# Interrupt time (loopback packets are processed in softirq) belongs to no process; it is
# shown apart, so "others" is other processes.
phase_end() { # name
    local b0 s0 i0 o0 t0 b1 s1 i1 o1
    read -r b0 s0 i0 o0 t0 <<<"${phase_start[$1]}"
    read -r b1 s1 i1 <<<"$(cpu_ticks)"
    own_ticks
    o1=$own
    load[$1]=$(awk -v b=$((b1 - b0)) -v s=$((s1 - s0)) -v i=$((i1 - i0)) -v o=$((o1 - o0)) \
        -v t="$(awk -v a="$t0" -v z="$EPOCHREALTIME" 'BEGIN { print z - a }')" -v n="$(nproc)" -v hz="$hz" 'BEGIN {
            all = t * n * hz; other = b - o - s - i; if (other < 0) other = 0
            printf "%.0f%% busy: this benchmark %.0f%%, interrupts %.0f%%, other processes %.0f%%, steal %.0f%%",
                100 * b / all, 100 * o / all, 100 * i / all, 100 * other / all, 100 * s / all }')
}

# Sets $busy_before (percent of all cores busy over 2 s) and $loadavg, and warns when the
# machine is not quiet.
measure_busy_before() {
    local busy0 busy1
    read -r busy0 _ <<<"$(cpu_ticks)"
    sleep 2
    read -r busy1 _ <<<"$(cpu_ticks)"
    busy_before=$(awk -v t=$((busy1 - busy0)) -v n="$(nproc)" -v hz="$hz" 'BEGIN { printf "%.0f", 100 * t / (2 * n * hz) }')
    loadavg=$(cut -d' ' -f1-3 /proc/loadavg)
    ((busy_before < 10)) || say "warning: the machine was $busy_before% busy before the benchmark; other work will skew the results"
}

seconds_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
verdict() { awk -v ok="$1" 'BEGIN { print (ok ? "PASS" : "MISS") }'; }
