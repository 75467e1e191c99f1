#!/usr/bin/env bash
# The test command: installs what the tests need, then format check, lints and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
command -v cargo >/dev/null || { echo "cargo is missing: install Rust 1.95 with rustup" >&2; exit 1; }
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test "$@"
