#!/bin/sh
# Start `spear up` on the probe's ports (NATS 63422, HTTP 63080), data in /tmp/fixB/$1, from this
# checkout or from the sources in $SPEAR_SRC (e.g. a worktree of main: before the fix); prints its pid.
dir=/tmp/fixB/${1:-up}
rm -rf "$dir" && mkdir -p "$dir"
cd "$(dirname "$0")/.." || exit 1
PYTHONPATH=${SPEAR_SRC:-} setsid .venv/bin/spear up --data-dir "$dir" --nats-port 63422 --http-port 63080 \
  --log-level WARNING >"$dir.log" 2>&1 &
echo $!
