"""The official Anthropic Python SDK talking to keyward over its Unix socket.

The SDK sends the keyward client token (kw_...) as `x-api-key`; keyward swaps in the real
Anthropic key, so the provider key never enters this process.

    KEYWARD_SOCKET=/run/keyward/keyward.sock KEYWARD_TOKEN=kw_... python anthropic_chat.py
"""

import os
import sys

import anthropic
import httpx2
from anthropic import Anthropic

MODEL = os.environ.get("ANTHROPIC_MODEL", "claude-3-5-haiku-latest")
PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]


def keyward_client(socket: str, token: str) -> Anthropic:
    # The SDK appends /v1/messages itself, so the base is just the target prefix. The Anthropic
    # SDK accepts only an httpx2 client. trust_env=False keeps an HTTP(S)_PROXY in the
    # environment from taking over the request (and the token).
    return Anthropic(
        api_key=token,
        base_url="http://keyward/anthropic",
        http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=socket), trust_env=False),
        max_retries=0,
    )


def main() -> int:
    client = keyward_client(os.environ["KEYWARD_SOCKET"], os.environ["KEYWARD_TOKEN"])
    try:
        raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=64, messages=PROMPT)
        message = raw.parse()
        print(f"keyward-call-id: {raw.headers.get('keyward-call-id')}")
        print(f"keyward-credential: {raw.headers.get('keyward-credential')}")
        text = "".join(block.text for block in message.content if block.type == "text")
        print(f"chat: {text}")
        print(f"usage: {message.usage.input_tokens} input, {message.usage.output_tokens} output")

        # Streaming: text_stream yields each text delta as keyward relays its event.
        pieces = []
        with client.messages.stream(model=MODEL, max_tokens=64, messages=PROMPT) as stream:
            for piece in stream.text_stream:
                pieces.append(piece)
            final = stream.get_final_message()
        print(f"stream chunks: {len(pieces)}")
        print(f"stream: {''.join(pieces)}")
        print(f"stream stop_reason: {final.stop_reason}")
    except anthropic.APIStatusError as e:
        # keyward's own refusals carry a `keyward-error` code; without it the provider answered.
        code = e.response.headers.get("keyward-error", "none (from the provider)")
        print(f"error: HTTP {e.status_code}, keyward-error: {code}: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
