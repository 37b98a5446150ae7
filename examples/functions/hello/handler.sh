#!/bin/sh
# sandscope "exec" handler: one process per invocation.
# The event (JSON) arrives on stdin; the response is whatever goes to stdout;
# every stderr line becomes a log line of the invocation.
event=$(cat)
echo "hello: got an event of ${#event} bytes in sandbox $(hostname)" >&2
printf '{"message":"hello from %s","event":%s}\n' "$(hostname)" "${event:-null}"
