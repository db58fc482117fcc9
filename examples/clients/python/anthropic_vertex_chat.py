"""The official Anthropic Python SDK's Vertex AI client talking to keyward over its Unix socket.

keyward holds the Google service account key (a `gcp-service-account` credential on the
`vertex` target), mints the OAuth2 access token and injects it; the app passes its keyward
client token (kw_...) where the SDK takes an access token, so no Google credential ever enters
this process.

    KEYWARD_SOCKET=/run/keyward/keyward.sock KEYWARD_TOKEN=kw_... python anthropic_vertex_chat.py
"""

import os
import sys

import anthropic
import httpx2
from anthropic import AnthropicVertex

MODEL = os.environ.get("VERTEX_MODEL", "claude-sonnet-4@20250514")
PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]


def keyward_client(socket: str, token: str) -> AnthropicVertex:
    # The SDK appends /projects/{project}/locations/{region}/publishers/anthropic/models/...
    # to base_url; the /vertex prefix routes to keyward's `vertex` target. access_token keeps
    # the SDK from looking for Google credentials.
    return AnthropicVertex(
        region=os.environ.get("VERTEX_REGION", "us-east5"),
        project_id=os.environ.get("VERTEX_PROJECT", "my-project"),
        access_token=token,
        base_url="http://keyward/vertex/v1",
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

        # Streaming (streamRawPredict): each text delta as keyward relays its event.
        pieces = []
        with client.messages.stream(model=MODEL, max_tokens=64, messages=PROMPT) as stream:
            for piece in stream.text_stream:
                pieces.append(piece)
            final = stream.get_final_message()
        print(f"stream chunks: {len(pieces)}")
        print(f"stream: {''.join(pieces)}")
        print(f"stream stop_reason: {final.stop_reason}")
    except anthropic.APIStatusError as e:
        code = e.response.headers.get("keyward-error", "none (from the provider)")
        print(f"error: HTTP {e.status_code}, keyward-error: {code}: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
