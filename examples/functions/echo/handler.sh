#!/bin/sh
# sandscope "persistent" handler (protocol sandscope-lines/1): started once per sandbox,
# prints `ready` when initialised, then answers one stdin line (the event) with one
# stdout line (the response). State survives between warm invocations.
echo "echo: runtime starting in $(hostname)" >&2
count=0
echo ready
while IFS= read -r event; do
  count=$((count + 1))
  printf '{"count":%d,"event":%s}\n' "$count" "${event:-null}"
done
