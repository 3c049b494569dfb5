#!/usr/bin/env bash
# Quick start: a working cart on one machine with nothing but Python 3.
#
#   scripts/quickstart.sh [start]   install (first time only), start, and print how to use it
#   scripts/quickstart.sh stop      stop what start started
#   scripts/quickstart.sh status    say what is running
#
# Everything lives in one directory (./quickstart): the config, a SQLite database, the
# volume, a broker made of plain files (kombu's filesystem transport, so no RabbitMQ), a
# local archive interface serving two demo files, and the logs and PIDs of the three
# processes it runs: the archive interface, one celery worker and pacifica-cartd.
#
# Environment (all optional):
#   QUICKSTART_DIR           where everything lives (default: quickstart/ in the checkout)
#   QUICKSTART_PORT          the cart's port (default 8081)
#   QUICKSTART_ARCHIVE_PORT  the archive interface's port (default 8080)
#   QUICKSTART_PYTHON        the Python that makes the virtual environments (default python3)
#   QUICKSTART_VENV          the cart's virtual environment (default .venv in the checkout);
#                            pacifica-cartd is installed into it unless it is there already
#   QUICKSTART_ARCHIVE_VENV  the archive interface's (default .venv-archive in the checkout): it
#                            pins peewee<4, which the cart cannot share
#   QUICKSTART_REINSTALL=1   install the cart again (after changing the code)
#   QUICKSTART_WAIT          seconds to wait for each process to answer (default 60)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${QUICKSTART_DIR:-$REPO/quickstart}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PORT=${QUICKSTART_PORT:-8081}
ARCHIVE_PORT=${QUICKSTART_ARCHIVE_PORT:-8080}
PYTHON=${QUICKSTART_PYTHON:-python3}
VENV=${QUICKSTART_VENV:-$REPO/.venv}
ARCHIVE_VENV=${QUICKSTART_ARCHIVE_VENV:-$REPO/.venv-archive}
WAIT=${QUICKSTART_WAIT:-60}
STOP_WAIT=20
ARCHIVE_REQUIREMENTS=('pacifica-archiveinterface==0.4.2' 'peewee<4' 'setuptools<81')
SERVICES=(server worker archive)

URL="http://127.0.0.1:$PORT"
ARCHIVE_URL="http://127.0.0.1:$ARCHIVE_PORT/"
CONFIG=$DIR/config.cfg
LOGS=$DIR/logs
RUN=$DIR/run

# The processes get only the quickstart's own files: nothing inherited that could point elsewhere.
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
export CARTD_CONFIG=$CONFIG CARTD_CPCONFIG=$DIR/server.conf

say() { printf '==> %s\n' "$*"; }
die() { printf 'quickstart: error: %s\n' "$*" >&2; exit 1; }

pid_of() { cut -d' ' -f1 "$RUN/$1.pid" 2>/dev/null || true; }

# started_at PID: when the process started (in clock ticks since boot), to tell it from a later one with its PID.
started_at() {
  if [[ -r /proc/$1/stat ]]; then
    sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f20
  fi
}

# alive NAME: the process that start launched under NAME is still there (not another one that got its PID since).
alive() {
  local pid recorded
  pid=$(pid_of "$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
  recorded=$(cut -s -d' ' -f2 "$RUN/$1.pid")
  [[ $(started_at "$pid") == "$recorded" ]]
}

# port_busy PORT: something accepts connections on 127.0.0.1:PORT.
port_busy() {
  "$PYTHON" -c 'import socket, sys
s = socket.socket()
s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"
}

# launch NAME COMMAND...: run COMMAND in a session of its own, output to logs/NAME.log, PID (and start
# time) to run/NAME.pid.
launch() {
  local name=$1
  shift
  printf '\n$ %s\n' "$*" >> "$LOGS/$name.log"
  setsid "$@" < /dev/null >> "$LOGS/$name.log" 2>&1 &
  echo "$! $(started_at $!)" > "$RUN/$name.pid"
}

log_tail() {
  printf -- '--- last lines of %s ---\n' "$LOGS/$1.log" >&2
  tail -n 30 "$LOGS/$1.log" >&2 || true
}

# wait_http NAME URL: wait (at most WAIT seconds) until URL answers 200; fail if the process dies.
wait_http() {
  local name=$1 url=$2 tries=$((WAIT * 5))
  for ((i = 0; i < tries; i++)); do
    alive "$name" || { log_tail "$name"; die "$name stopped before it answered $url"; }
    if "$VENV/bin/python" -c 'import sys, urllib.request
sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=2).status == 200 else 1)' "$url" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  log_tail "$name"
  die "$name did not answer $url within $WAIT s"
}

# wait_log NAME TEXT: wait (at most WAIT seconds) until the process's log says TEXT.
wait_log() {
  local name=$1 text=$2 tries=$((WAIT * 5))
  for ((i = 0; i < tries; i++)); do
    alive "$name" || { log_tail "$name"; die "$name stopped before it was ready"; }
    grep -qF -- "$text" "$LOGS/$name.log" && return 0
    sleep 0.2
  done
  log_tail "$name"
  die "$name was not ready within $WAIT s"
}

# stop_all: SIGTERM every process start launched, wait for them (at most STOP_WAIT s), then SIGKILL what is
# left of their sessions (each leads its own process group: setsid).
stop_all() {
  local name pid pids=() names=()
  for name in "${SERVICES[@]}"; do
    if alive "$name"; then
      pid=$(pid_of "$name")
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
      names+=("$name")
    fi
  done
  for i in "${!pids[@]}"; do
    for ((tick = 0; tick < STOP_WAIT * 10; tick++)); do
      kill -0 "${pids[$i]}" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-${pids[$i]}" 2>/dev/null || true
    echo "stopped ${names[$i]} (pid ${pids[$i]})"
  done
  for name in "${SERVICES[@]}"; do
    rm -f "$RUN/$name.pid"
  done
}

status() {
  local running=0
  for name in "${SERVICES[@]}"; do
    if alive "$name"; then
      echo "$name: running (pid $(pid_of "$name"), log $LOGS/$name.log)"
      running=1
    else
      echo "$name: not running"
    fi
  done
  ((running))
}

# make_venv DIR: a new virtual environment (a half-made one is removed, so the next run starts clean).
make_venv() {
  [[ -x $1/bin/python ]] && return 0
  if ! "$PYTHON" -m venv "$1"; then
    rm -rf "$1"
    die "$PYTHON cannot make a virtual environment (on Debian and Ubuntu: apt-get install python3-venv)"
  fi
}

install() {
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
    die "$PYTHON is older than Python 3.10 (set QUICKSTART_PYTHON to a newer one)"
  if [[ ! -x $VENV/bin/pacifica-cartd || ${QUICKSTART_REINSTALL:-} == 1 ]]; then
    say "installing pacifica-cartd into $VENV"
    make_venv "$VENV"
    # build in a copy: an in-tree build/ would leave stale files in the checkout
    local src
    src=$(mktemp -d)
    tar -C "$REPO" --exclude=./.venv --exclude=./.venv-archive --exclude=./.git --exclude=./quickstart \
      --exclude=./.cache --exclude=./build -cf - . | tar -C "$src" -xf -
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$src"
    rm -rf "$src"
  fi
  if [[ ! -x $ARCHIVE_VENV/bin/pacifica-archiveinterface ]]; then
    say "installing the archive interface into $ARCHIVE_VENV"
    make_venv "$ARCHIVE_VENV"
    "$ARCHIVE_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${ARCHIVE_REQUIREMENTS[@]}"
  fi
}

write_files() {
  mkdir -p "$LOGS" "$RUN" "$DIR/archive" "$DIR/volume" "$DIR/archive-config"
  cat > "$CONFIG" <<EOF
# Written by scripts/quickstart.sh: everything on this machine, no broker or database server.
[cartd]
volume_path = $DIR/volume

[archiveinterface]
url = $ARCHIVE_URL

[celery]
# kombu's filesystem transport: messages are files under this directory
broker_url = filesystem://$DIR/broker

[database]
peewee_url = sqliteext:///$DIR/db.sqlite3
EOF
  cat > "$DIR/server.conf" <<EOF
[global]
log.screen: True
server.socket_host: '127.0.0.1'
server.socket_port: $PORT
EOF
  cat > "$DIR/archive-config/cpconfig.ini" <<'EOF'
[global]
engine.autoreload.on: False

[/]
request.dispatch: cherrypy.dispatch.MethodDispatcher()
EOF
  cat > "$DIR/archive-config/config.ini" <<'EOF'
[posix]
use_id2filename = false
EOF
  # the demo files: archive ids 1 and 2 (the posix backend serves id N from archive/N)
  printf 'Hello from the Pacifica archive!\n' > "$DIR/archive/1"
  printf 'x,y\n1,1\n2,4\n3,9\n' > "$DIR/archive/2"
}

start() {
  local name
  for name in "${SERVICES[@]}"; do
    ! alive "$name" || die "already running ($(status | tr '\n' ' ')); stop it with: bash $0 stop"
  done
  port_busy "$PORT" && die "port $PORT is in use: set QUICKSTART_PORT to a free port"
  port_busy "$ARCHIVE_PORT" && die "port $ARCHIVE_PORT is in use: set QUICKSTART_ARCHIVE_PORT to a free port"
  install
  write_files
  trap 'rc=$?; if ((rc)); then stop_all; fi' EXIT

  say "starting the archive interface on $ARCHIVE_URL (files in $DIR/archive)"
  launch archive "$ARCHIVE_VENV/bin/pacifica-archiveinterface" -a 127.0.0.1 -p "$ARCHIVE_PORT" -t posix \
    --prefix "$DIR/archive" --cherrypy-config "$DIR/archive-config/cpconfig.ini" -c "$DIR/archive-config/config.ini"
  wait_http archive "$ARCHIVE_URL"

  say "creating the database $DIR/db.sqlite3"
  "$VENV/bin/pacifica-cartd-cmd" dbsync

  say "starting a celery worker (broker: the files under $DIR/broker)"
  launch worker "$VENV/bin/celery" -A pacifica.cartd.tasks worker --loglevel INFO --concurrency 2 \
    --without-gossip --without-mingle --without-heartbeat -n "quickstart@%h"
  say "starting pacifica-cartd on $URL"
  launch server "$VENV/bin/pacifica-cartd"
  wait_log worker ' ready.'
  wait_http server "$URL/"
  trap - EXIT

  cat <<EOF

The cart is running at $URL (config $CONFIG, logs in $LOGS).
The archive holds two demo files, ids 1 and 2. Ask for both as a cart named "demo", poll it
until X-Pacifica-Status says ready, download it and delete it:

curl -X POST -H 'Content-Type: application/json' $URL/demo -d '{"fileids": [
  {"id": "1", "path": "hello.txt", "hashtype": "sha1", "hashsum": "$(sha "$DIR/archive/1" sha1)"},
  {"id": "2", "path": "squares.csv", "hashtype": "md5", "hashsum": "$(sha "$DIR/archive/2" md5)"}]}'
for poll in \$(seq 60); do curl -sI $URL/demo | grep 'X-Pacifica-Status: staging' >/dev/null || break; sleep 1; done
curl -I $URL/demo
curl -o demo.tar '$URL/demo?filename=demo.tar'
tar -tvf demo.tar
curl -X DELETE $URL/demo

Stop it with: bash $0 stop
EOF
}

# sha FILE ALGORITHM: the hex digest of a file.
sha() {
  "$VENV/bin/python" -c 'import hashlib, sys; print(hashlib.new(sys.argv[2], open(sys.argv[1], "rb").read()).hexdigest())' "$1" "$2"
}

case ${1:-start} in
  start) start ;;
  stop) stop_all ;;
  status) status ;;
  *) die "usage: $0 [start|stop|status]" ;;
esac
