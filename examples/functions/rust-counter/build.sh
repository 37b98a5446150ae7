#!/bin/sh
# Static build (glibc crt-static), copied to ./bootstrap: the sandbox runs ./bootstrap.
set -eu
cd "$(dirname "$0")"
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release --target x86_64-unknown-linux-gnu --target-dir target
cp target/x86_64-unknown-linux-gnu/release/rust-counter bootstrap
