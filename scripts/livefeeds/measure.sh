#!/bin/sh
# The probe57 matrix against a fresh `spear up` (scripts/livefeeds/up.sh: SPEAR_SRC=<sources> for another version).
# usage: scripts/livefeeds/measure.sh NAME [N MODE]...   e.g. scripts/livefeeds/measure.sh after 200 read 200 noread
cd "$(dirname "$0")/.." || exit 1
name=$1; shift
pid=$(./scripts/livefeeds/up.sh "$name")
trap 'kill -TERM $pid; while kill -0 $pid 2>/dev/null; do sleep 0.5; done' EXIT
for _ in $(seq 60); do curl -sf localhost:63080/api/v1/health | grep -q '"healthy"' && break; sleep 0.5; done
while [ $# -ge 2 ]; do
  timeout 900 .venv/bin/python scripts/livefeeds/sse_feeds.py 63422 63080 "$1" "$2" 2>&1 | grep -v '^health'
  shift 2
done
