#!/usr/bin/env bash
# A fleet on one machine: one authoring keyward, three sidecars serving one sealed bundle from
# a directory laid out like a Kubernetes Secret volume, a key rotation rolled out to all three
# by swapping the volume's ..data symlink, and the three audit streams (their standard output)
# merged and verified with the master key alone.
#
# Run: bash examples/fleet.sh            (builds target/debug/keyward if needed)
# Needs: bash, curl, python3 (a stand-in provider on 127.0.0.1; no internet).
# Set KEYWARD=/path/to/keyward to use another build, KEEP=1 to keep the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."

KEYWARD=${KEYWARD:-target/debug/keyward}
if [ ! -x "$KEYWARD" ]; then
  cargo build --quiet
fi
KEYWARD=$(realpath "$KEYWARD")
WORK=$(mktemp -d /tmp/keyward-fleet.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }

# --- a stand-in provider: answers every POST with an OpenAI-shaped reply naming the last four
# characters of the key it was called with (the keys here are made up for the walk-through).
PORT_FILE=$WORK/provider.port
python3 - "$PORT_FILE" <<'PY' &
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        key = self.headers.get("authorization", "").removeprefix("Bearer ")
        body = json.dumps({"id": "chatcmpl-fleet", "object": "chat.completion", "model": "demo",
            "choices": [{"index": 0, "message": {"role": "assistant",
            "content": f"served with the key ending {key[-4:]}"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
open(sys.argv[1], "w").write(str(server.server_address[1]))
server.serve_forever()
PY
PIDS+=($!)
for _ in $(seq 100); do [ -s "$PORT_FILE" ] && break; sleep 0.05; done
PORT=$(cat "$PORT_FILE")

# --- one master key for the fleet (in production: a KMS or HSM key, README "Key custody").
MASTER=$WORK/master.key
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$MASTER")

common_config() { # $1 = home, $2 = more top-level keys
  cat <<EOF
${2:-}
state_dir = "$1/state"
socket = "$1/keyward.sock"
admin_socket = "$1/admin.sock"
master_key_file = "$MASTER"
require_external_master_key = true
lock_memory = "secrets"

[targets.llm]
base_url = "http://127.0.0.1:$PORT"
auth_header = "Authorization"
auth_format = "Bearer {key}"
family = "openai"
EOF
}

start() { # $1 = home; waits until its admin socket answers
  (umask 077; mkdir -p "$1")
  "$KEYWARD" serve --config "$1/keyward.toml" > "$1/stdout" 2> "$1/stderr" &
  PIDS+=($!)
  for _ in $(seq 200); do
    KEYWARD_ADMIN_SOCKET=$1/admin.sock "$KEYWARD" status > /dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "keyward in $1 did not start:"; cat "$1/stderr"; exit 1
}

kw() { # $1 = home, then a CLI command
  local home=$1; shift
  KEYWARD_ADMIN_SOCKET=$home/admin.sock "$KEYWARD" "$@"
}

say "authoring keyward: a tenant, a client, a provider key"
AUTHOR=$WORK/author
mkdir -p "$AUTHOR" && chmod 700 "$AUTHOR"
common_config "$AUTHOR" > "$AUTHOR/keyward.toml"
start "$AUTHOR"
kw "$AUTHOR" tenant add acme
TOKEN=$(kw "$AUTHOR" client add --tenant acme --name web --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
CRED=$(printf %s "sk-fleet-demo-key-one-AAAA" | kw "$AUTHOR" cred add --tenant acme --target llm --name main --json \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
kw "$AUTHOR" cred list

# A Kubernetes Secret volume: keyward.bundle -> ..data/keyward.bundle, ..data -> ..<timestamp>.
SECRET=$WORK/secret
mkdir -p "$SECRET"
publish() { # $1 = bundle file; swaps it in the way the kubelet does
  local dir="..$(date +%Y_%m_%d_%H_%M_%S.%N)"
  mkdir "$SECRET/$dir" && cp "$1" "$SECRET/$dir/keyward.bundle"
  ln -s "$dir" "$SECRET/..data_tmp" && mv -T "$SECRET/..data_tmp" "$SECRET/..data"
  [ -e "$SECRET/keyward.bundle" ] || ln -s ..data/keyward.bundle "$SECRET/keyward.bundle"
}
say "export bundle serial 1 and publish it"
kw "$AUTHOR" bundle export --out "$WORK/acme-1.bundle" --tenant acme
publish "$WORK/acme-1.bundle"

say "three sidecars serve the bundle, audit rows on their standard output"
for i in 1 2 3; do
  home=$WORK/sidecar-$i
  mkdir -p "$home" && chmod 700 "$home"
  common_config "$home" "$(printf 'bundle = "%s"\naudit_export = "stdout"' "$SECRET")" > "$home/keyward.toml"
  start "$home"
done
call() { # $1 = sidecar number
  curl -s --unix-socket "$WORK/sidecar-$1/keyward.sock" http://keyward/llm/v1/chat/completions \
    -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d '{"model":"demo","messages":[{"role":"user","content":"hi"}]}' \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
}
for i in 1 2 3; do echo "sidecar-$i: $(call $i)"; done
echo "a change on a sidecar is refused:"
kw "$WORK/sidecar-1" tenant add other || true

say "rotate the key on the authoring keyward, export serial 2, publish"
printf %s "sk-fleet-demo-key-two-BBBB" | kw "$AUTHOR" cred rotate "$CRED" --overlap 0s
kw "$AUTHOR" bundle export --out "$WORK/acme-2.bundle" --tenant acme
publish "$WORK/acme-2.bundle"
for i in 1 2 3; do
  for _ in $(seq 200); do
    kw "$WORK/sidecar-$i" status --json | grep -q '"serial":2' && break
    sleep 0.05
  done
  echo "sidecar-$i: serial $(kw "$WORK/sidecar-$i" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bundle"]["serial"])'), $(call "$i")"
done

say "stop the sidecars, merge their audit streams, verify with the master key alone"
for i in 1 2 3; do
  kw "$WORK/sidecar-$i" status --json | python3 -c 'import json,sys; s=json.load(sys.stdin); print("sidecar-'"$i"' instance", s["instance"])'
done
for pid in "${PIDS[@]:2:3}"; do kill -TERM "$pid"; done
for pid in "${PIDS[@]:2:3}"; do wait "$pid" || true; done
# A log pipeline delivers lines of many pods interleaved: merge by time.
python3 - "$WORK"/sidecar-{1,2,3}/stdout > "$WORK/merged.jsonl" <<'PY'
import json, sys
lines = []
for path in sys.argv[1:]:
    for n, line in enumerate(open(path)):
        v = json.loads(line)
        lines.append((v.get("time_ms", float("inf")), path, n, line))
for *_, line in sorted(lines):
    sys.stdout.write(line)
PY
echo "$(wc -l < "$WORK/merged.jsonl") lines in $WORK/merged.jsonl"
"$KEYWARD" audit verify --jsonl "$WORK/merged.jsonl" --master-key-file "$MASTER"
