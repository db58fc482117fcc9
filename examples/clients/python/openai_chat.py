"""The official OpenAI Python SDK talking to keyward over its Unix socket.

The app holds only a keyward client token (kw_...), passed where the SDK expects its API key.
keyward authenticates it, injects the real provider key and calls the provider over TLS; the
provider key never enters this process.

    KEYWARD_SOCKET=/run/keyward/keyward.sock KEYWARD_TOKEN=kw_... python openai_chat.py
"""

import os
import sys

import httpx2
import openai
from openai import OpenAI

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]


def keyward_client(socket: str, token: str) -> OpenAI:
    # The host part of base_url is never dialled (the transport always connects to the socket),
    # but the path prefix is what routes to keyward's `openai` target. trust_env=False: an
    # HTTP(S)_PROXY in the environment would otherwise take over http:// URLs and receive the
    # token instead of the socket.
    return OpenAI(
        api_key=token,
        base_url="http://keyward/openai/v1",
        http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=socket), trust_env=False),
        max_retries=0,
    )


def main() -> int:
    client = keyward_client(os.environ["KEYWARD_SOCKET"], os.environ["KEYWARD_TOKEN"])
    try:
        # A normal call; the raw response also shows which audit record and key served it.
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=PROMPT)
        completion = raw.parse()
        print(f"keyward-call-id: {raw.headers.get('keyward-call-id')}")
        print(f"keyward-credential: {raw.headers.get('keyward-credential')}")
        print(f"chat: {completion.choices[0].message.content}")
        print(f"usage: {completion.usage.prompt_tokens} prompt, {completion.usage.completion_tokens} completion")

        # A streaming call: keyward relays each server-sent event as it arrives.
        pieces = []
        stream = client.chat.completions.create(model=MODEL, messages=PROMPT, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        print(f"stream chunks: {len(pieces)}")
        print(f"stream: {''.join(pieces)}")
    except openai.APIStatusError as e:
        # keyward's own refusals carry a `keyward-error` code (unauthenticated, scope_denied, ...);
        # without it the status came from the provider.
        code = e.response.headers.get("keyward-error", "none (from the provider)")
        print(f"error: HTTP {e.status_code}, keyward-error: {code}: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
