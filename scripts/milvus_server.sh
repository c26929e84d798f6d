#!/usr/bin/env bash
# A real Milvus server on this machine, for CI and benchmarks: the standalone server (etcd and RocksMQ built in)
# that the PyPI package milvus==2.3.5 carries, in a venv of its own (.milvus-venv: it needs nothing from facedb's
# and its [client] extra pins an old pymilvus, so it is left out). It listens on all interfaces (the
# wrapper's choice); facedb's tests and benchmarks connect to 127.0.0.1.
#
#   scripts/milvus_server.sh start NAME [milvus-server options]   # fresh data dir, waits for /healthz, prints the URI
#   scripts/milvus_server.sh stop NAME                            # SIGINT to the wrapper, waits for the server to go
#   scripts/milvus_server.sh restart NAME                         # stop, start again on the same data and options
#   scripts/milvus_server.sh uri NAME                             # the URI of a running instance
#   scripts/milvus_server.sh kill NAME                            # a crash: SIGKILL to the server (fault drills);
#                                                                 # `restart NAME` brings it back on the same data
#
# e.g. `start auth --authorization-enabled true --proxy-port 19630`: a second instance with authorisation on
# (user root, password Milvus); a second instance gets free etcd ports by itself (or give --etcd-port P).
# State lives in .milvus-run/NAME/ (git-ignored): data, logs, the wrapper's pid.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MILVUS_VENV:-.milvus-venv}
RUN=${MILVUS_RUN:-.milvus-run}
WAIT_S=${MILVUS_WAIT_S:-180}
cmd=${1:?usage: $0 start|stop|uri NAME [options]}
name=${2:?usage: $0 start|stop|uri NAME [options]}
shift 2
dir=$RUN/$name

running() { [ -f "$dir/wrapper.pid" ] && kill -0 "$(cat "$dir/wrapper.pid")" 2>/dev/null; }
# A process that exists and is not a zombie: a killed server stays its wrapper's zombie child until the wrapper
# reaps it, and `kill -0` succeeds on a zombie (waiting for one to go took each restart after a kill 60 s).
alive() { [ -n "$1" ] && [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
# The milvus binary the wrapper started (its only child): its environment holds the health port the wrapper chose
# (the first free one from 9091 up, so a second instance gets another).
server_pid() {
  local p
  for p in $(pgrep -P "$(cat "$dir/wrapper.pid")" -x milvus 2>/dev/null); do alive "$p" && { echo "$p"; return; }; done
}
listening() { ss -Htln "( sport = :$1 )" 2>/dev/null | grep -q .; }
health_port() { tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | sed -n 's/^METRICS_PORT=//p'; }
# The wrapper also moves a taken port to the next free one, so the proxy's port is read from the config it wrote.
proxy_port() { awk '/^proxy:/{p=1; next} /^[^ #]/{p=0} p && /^  port:/{print $2; exit}' "$dir/data/configs/milvus.yaml"; }

case $cmd in
start|restart)
  if [ "$cmd" = restart ]; then
    [ -f "$dir/args" ] || { echo "milvus $name was never started here" >&2; exit 1; }
    "$0" stop "$name"
    mapfile -t saved <"$dir/args"
    set -- "${saved[@]}"
  else
    if running; then echo "milvus $name is already running (pid $(cat "$dir/wrapper.pid"))" >&2; exit 1; fi
    if [ ! -x "$VENV/bin/milvus-server" ]; then
      python3 -m venv "$VENV"
      "$VENV/bin/pip" install -q milvus==2.3.5
    fi
    rm -rf "$dir" && mkdir -p "$dir"
    # A second instance needs an etcd of its own: the wrapper moves every other taken port, but not etcd's
    # (2379, peer 2380), and the server then dies at start ("bind: address already in use"). Unless given,
    # the first free pair from 2479 (step 100) is chosen when the defaults are taken, and kept for restarts.
    if ! printf '%s\n' "$@" | grep -qx -- --etcd-port && { listening 2379 || listening 2380; }; then
      p=2479
      while listening "$p" || listening $((p + 1)); do p=$((p + 100)); done
      set -- "$@" --etcd-port "$p"
    fi
    [ $# -eq 0 ] || printf '%s\n' "$@" >"$dir/args"
    touch "$dir/args"
  fi
  # The wrapper moves a port it cannot bind to the next free one, and the server would serve elsewhere. It probes
  # through scripts/milvus_wrapper.py, with SO_REUSEADDR, so connections a previous server left in TIME_WAIT do
  # not count (without it a restart waited ~60 s for them); wait only for a previous server still listening.
  want=19530
  prev=""
  for a in "$@"; do [ "$prev" = --proxy-port ] && want=$a; prev=$a; done
  for _ in $(seq 1 150); do
    ss -Htln "( sport = :$want )" 2>/dev/null | grep -q . || break
    sleep 0.5
  done
  # The embedded etcd's peer port (2380) is not a milvus-server option: with --etcd-port P, the etcd gets a config
  # file of its own (client P, peer P+1, on 127.0.0.1) through Milvus's ETCD_CONFIG_PATH, so two instances coexist.
  etcd_port=""
  prev=""
  for a in "$@"; do [ "$prev" = --etcd-port ] && etcd_port=$a; prev=$a; done
  if [ -n "$etcd_port" ]; then
    cat >"$dir/etcd.yaml" <<EOF
name: $name
listen-client-urls: http://127.0.0.1:$etcd_port
advertise-client-urls: http://127.0.0.1:$etcd_port
listen-peer-urls: http://127.0.0.1:$((etcd_port + 1))
initial-advertise-peer-urls: http://127.0.0.1:$((etcd_port + 1))
initial-cluster: $name=http://127.0.0.1:$((etcd_port + 1))
EOF
    export ETCD_CONFIG_PATH=$(realpath "$dir/etcd.yaml")  # MILVUS_RUN may be absolute
  fi
  "$VENV/bin/python" scripts/milvus_wrapper.py --data "$dir/data" "$@" >"$dir/wrapper.log" 2>&1 </dev/null &
  echo $! >"$dir/wrapper.pid"
  t0=$(date +%s)
  while :; do
    if ! running; then echo "milvus $name exited while starting; see $dir/" >&2; tail -5 "$dir/wrapper.log" >&2; exit 1; fi
    pid=$(server_pid || true)
    # Only a zombie child left, for 3 s: the server died (a zombie seen once may be a short-lived child)
    if [ -z "$pid" ] && pgrep -P "$(cat "$dir/wrapper.pid")" -x milvus >/dev/null 2>&1; then
      dead=$((${dead:-0} + 1))
    else
      dead=0
    fi
    if [ "$dead" -ge 6 ]; then
      echo "milvus $name died while starting; see $dir/data/logs/" >&2
      grep -h '\[ERROR\]' "$dir/data/logs/milvus-stdout.log" 2>/dev/null | sed 's/ \[stack=.*//' | head -3 >&2
      "$0" stop "$name" || true
      exit 1
    fi
    port=${pid:+$(health_port "$pid")}
    if [ -n "${port:-}" ] && curl -fsS "http://127.0.0.1:$port/healthz" 2>/dev/null | grep -q OK; then break; fi
    if [ $(( $(date +%s) - t0 )) -ge "$WAIT_S" ]; then
      echo "milvus $name not healthy after ${WAIT_S}s; stopping it; see $dir/" >&2
      "$0" stop "$name" || true
      exit 1
    fi
    sleep 0.5
  done
  echo "$port" >"$dir/health.port"
  if [ "$(proxy_port)" != "$want" ]; then
    echo "milvus $name came up on port $(proxy_port), not $want (taken); stopping it" >&2
    "$0" stop "$name" || true
    exit 1
  fi
  echo "http://127.0.0.1:$(proxy_port)" | tee "$dir/uri"
  echo "milvus $name healthy in $(( $(date +%s) - t0 )) s (health port $port, pid $(cat "$dir/wrapper.pid"))" >&2
  ;;
stop)
  if ! running; then echo "milvus $name is not running" >&2; exit 0; fi
  wpid=$(cat "$dir/wrapper.pid")
  spid=$(server_pid || true)
  # The server itself first, with SIGTERM, given time to stop gracefully: the wrapper's own stop SIGKILLs it after
  # 1 s, which leaves its coordinators' sessions in etcd until their 30 s lease runs out, and the next start then
  # waits that long before it serves (measured: healthy 48 s after such a restart).
  if [ -n "$spid" ]; then
    kill -TERM "$spid" 2>/dev/null || true
    for _ in $(seq 1 120); do alive "$spid" || break; sleep 0.5; done
  fi
  kill -INT "$wpid" 2>/dev/null || true  # the wrapper then exits (it stops its server, if still there, too)
  for _ in $(seq 1 120); do
    alive "$wpid" || alive "$spid" || break
    sleep 0.5
  done
  if alive "$wpid"; then kill -KILL "$wpid"; fi
  if alive "$spid"; then kill -KILL "$spid"; fi
  rm -f "$dir/wrapper.pid"
  echo "milvus $name stopped" >&2
  ;;
kill)
  running || { echo "milvus $name is not running" >&2; exit 1; }
  spid=$(server_pid || true)
  [ -n "$spid" ] || { echo "milvus $name has no server process" >&2; exit 1; }
  kill -KILL "$spid"
  echo "milvus $name: server pid $spid killed (SIGKILL)" >&2
  ;;
uri)
  running || { echo "milvus $name is not running" >&2; exit 1; }
  cat "$dir/uri"
  ;;
*)
  echo "usage: $0 start|stop|restart|kill|uri NAME [milvus-server options]" >&2; exit 2
  ;;
esac
