#!/bin/sh
# Install awslambdaric (manylinux wheel for CPython 3.11, matching Debian bookworm's
# /usr/bin/python3) into ./package. Any pip can do it: the wheel is picked by platform.
set -eu
cd "$(dirname "$0")"
py=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
python3 -m pip install -q --upgrade --target package --only-binary=:all: \
    --platform manylinux2014_x86_64 --python-version "$py" awslambdaric
