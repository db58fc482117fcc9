"""Google's Gen AI Python SDK (google-genai) in Vertex AI mode talking to keyward over its Unix
socket.

keyward holds the Google service account key (a `gcp-service-account` credential on the
`vertex` target), mints the OAuth2 access token and injects it; the app hands the SDK its
keyward client token (kw_...) as an already-issued OAuth2 token, so the SDK neither looks for
Google credentials nor refreshes anything, and no Google credential ever enters this process.

    KEYWARD_SOCKET=/run/keyward/keyward.sock KEYWARD_TOKEN=kw_... python google_genai_vertex_chat.py
"""

import os
import sys

import google.oauth2.credentials
import httpx2
from google import genai
from google.genai import errors, types

MODEL = os.environ.get("VERTEX_MODEL", "gemini-2.0-flash")
PROMPT = "Say hello in one short sentence."


def keyward_client(socket: str, token: str) -> genai.Client:
    # The SDK sends {base_url}/v1/projects/{project}/locations/{location}/publishers/google/
    # models/{model}:generateContent; the /vertex prefix routes to keyward's `vertex` target.
    # A token without an expiry is never refreshed: it goes out as `Authorization: Bearer`.
    return genai.Client(
        vertexai=True,
        project=os.environ.get("VERTEX_PROJECT", "my-project"),
        location=os.environ.get("VERTEX_LOCATION", "us-central1"),
        credentials=google.oauth2.credentials.Credentials(token=token),
        http_options=types.HttpOptions(
            base_url="http://keyward/vertex/",
            api_version="v1",
            # trust_env=False: an HTTP(S)_PROXY in the environment must not take over.
            httpx_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=socket), trust_env=False),
            retry_options=types.HttpRetryOptions(attempts=1),
        ),
    )


def main() -> int:
    client = keyward_client(os.environ["KEYWARD_SOCKET"], os.environ["KEYWARD_TOKEN"])
    try:
        response = client.models.generate_content(model=MODEL, contents=PROMPT)
        headers = response.sdk_http_response.headers if response.sdk_http_response else {}
        print(f"keyward-call-id: {headers.get('keyward-call-id')}")
        print(f"keyward-credential: {headers.get('keyward-credential')}")
        print(f"chat: {response.text}")
        usage = response.usage_metadata
        print(f"usage: {usage.prompt_token_count} input, {usage.candidates_token_count} output")

        # Streaming (streamGenerateContent?alt=sse): each chunk as keyward relays its event.
        pieces = []
        for chunk in client.models.generate_content_stream(model=MODEL, contents=PROMPT):
            if chunk.text:
                pieces.append(chunk.text)
        print(f"stream chunks: {len(pieces)}")
        print(f"stream: {''.join(pieces)}")
    except errors.APIError as e:
        headers = e.response.headers if e.response is not None else {}
        code = headers.get("keyward-error", "none (from the provider)")
        print(f"error: HTTP {e.code}, keyward-error: {code}: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
