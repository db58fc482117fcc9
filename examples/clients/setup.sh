#!/usr/bin/env bash
# Installs the pinned SDKs the client examples use:
#   - a Python venv at target/sdk-venv with python/requirements.txt (PyPI; recreated when the
#     pins change so no stale package lingers),
#   - node/node_modules from node/package-lock.json (`npm ci`).
# Idempotent: each half is skipped when its pins have not changed since the last run, and a
# lock serialises concurrent runs (parallel test binaries may call it at the same time).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$root/target/sdk-venv"
requirements="$here/python/requirements.txt"
node_dir="$here/node"

mkdir -p "$(dirname "$venv")"
exec 9>"$(dirname "$venv")/.sdk-setup.lock"
flock 9

fingerprint() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

# --- Python ---
py_stamp="$venv/.keyward-requirements"
py_want="$(fingerprint "$requirements")"
if [ -x "$venv/bin/python" ] && [ "$(cat "$py_stamp" 2>/dev/null)" = "$py_want" ]; then
    echo "setup: python SDKs up to date in $venv"
else
    echo "setup: installing python SDKs into $venv"
    python3 -m venv --clear "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --requirement "$requirements"
    echo "$py_want" >"$py_stamp"
fi

# --- Node ---
node_stamp="$node_dir/node_modules/.keyward-lock"
node_want="$(fingerprint "$node_dir/package.json" "$node_dir/package-lock.json")"
if [ -d "$node_dir/node_modules" ] && [ "$(cat "$node_stamp" 2>/dev/null)" = "$node_want" ]; then
    echo "setup: node SDKs up to date in $node_dir/node_modules"
else
    echo "setup: npm ci in $node_dir"
    (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$node_want" >"$node_stamp"
fi

"$venv/bin/python" -c 'import openai, anthropic, httpx2; print(f"setup: python openai {openai.__version__}, anthropic {anthropic.__version__}, httpx2 {httpx2.__version__}")'
(cd "$node_dir" && node -e 'const fs = require("fs"); const v = (n) => JSON.parse(fs.readFileSync(`node_modules/${n}/package.json`)).version; console.log(`setup: node openai ${v("openai")}, undici ${v("undici")}`)')
