#!/usr/bin/env bash
# Plain curl through keyward's Unix socket: one OpenAI chat call, the same call streamed (-N so
# each server-sent event prints as it arrives), and one Anthropic Messages call.
#
#   KEYWARD_SOCKET=/run/keyward/keyward.sock KEYWARD_TOKEN=kw_... ./curl.sh
#
# The host in the URL is ignored; the path is /{target}/{provider path}. The client token goes
# where the provider's API key would; keyward swaps in the real key. Headers are passed with
# -H @file from a here-string so the token never appears in curl's argv (visible in `ps`).
set -euo pipefail

: "${KEYWARD_SOCKET:?set KEYWARD_SOCKET to the keyward data socket path}"
: "${KEYWARD_TOKEN:?set KEYWARD_TOKEN to a kw_ client token}"
model="${OPENAI_MODEL:-gpt-4o-mini}"
claude="${ANTHROPIC_MODEL:-claude-3-5-haiku-latest}"

kw() {
    # --noproxy: an http_proxy in the environment must not receive the token.
    curl --silent --show-error --fail-with-body --noproxy "*" --unix-socket "$KEYWARD_SOCKET" "$@"
}

echo "== openai chat =="
kw http://keyward/openai/v1/chat/completions \
    -H @- <<<"Authorization: Bearer $KEYWARD_TOKEN" \
    -H 'Content-Type: application/json' \
    -d "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello.\"}]}"
echo

echo "== openai stream =="
kw -N http://keyward/openai/v1/chat/completions \
    -H @- <<<"Authorization: Bearer $KEYWARD_TOKEN" \
    -H 'Content-Type: application/json' \
    -d "{\"model\":\"$model\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"Say hello.\"}]}"
echo

echo "== anthropic messages =="
kw http://keyward/anthropic/v1/messages \
    -H @- <<<"x-api-key: $KEYWARD_TOKEN" \
    -H 'Content-Type: application/json' \
    -d "{\"model\":\"$claude\",\"max_tokens\":64,\"messages\":[{\"role\":\"user\",\"content\":\"Say hello.\"}]}"
echo
