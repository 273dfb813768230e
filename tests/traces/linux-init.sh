#!/bin/sh
# /init of the recorded Linux trace (tests/traces/linux.trace): a short
# boot to an interactive shell that runs one typed line.
echo init: first line
exec /bin/sh
