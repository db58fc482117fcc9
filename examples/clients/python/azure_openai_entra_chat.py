"""The official OpenAI Python SDK's Azure client, with Entra ID, talking to keyward over its
Unix socket.

keyward holds the app registration's client secret (an `azure-entra` credential on the
`azure-openai` target), gets the Entra ID token and injects it as `Authorization: Bearer`; the
app passes its keyward client token (kw_...) as `azure_ad_token`, so no Azure credential ever
enters this process.

    KEYWARD_SOCKET=/run/keyward/keyward.sock KEYWARD_TOKEN=kw_... python azure_openai_entra_chat.py
"""

import os
import sys

import httpx2
import openai
from openai import AzureOpenAI

DEPLOYMENT = os.environ.get("AZURE_OPENAI_DEPLOYMENT", "gpt-4o")
PROMPT = [{"role": "user", "content": "Say hello in one short sentence."}]


def keyward_client(socket: str, token: str) -> AzureOpenAI:
    # The SDK calls {azure_endpoint}/openai/deployments/{deployment}/...; the /azure-openai
    # prefix routes to keyward's target, whose base_url is the real resource.
    return AzureOpenAI(
        azure_endpoint="http://keyward/azure-openai",
        azure_ad_token=token,
        api_version=os.environ.get("AZURE_OPENAI_API_VERSION", "2024-10-21"),
        http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=socket), trust_env=False),
        max_retries=0,
    )


def main() -> int:
    client = keyward_client(os.environ["KEYWARD_SOCKET"], os.environ["KEYWARD_TOKEN"])
    try:
        raw = client.chat.completions.with_raw_response.create(model=DEPLOYMENT, messages=PROMPT)
        completion = raw.parse()
        print(f"keyward-call-id: {raw.headers.get('keyward-call-id')}")
        print(f"keyward-credential: {raw.headers.get('keyward-credential')}")
        print(f"chat: {completion.choices[0].message.content}")
        print(f"usage: {completion.usage.prompt_tokens} input, "
              f"{completion.usage.completion_tokens} output")

        pieces = []
        stream = client.chat.completions.create(model=DEPLOYMENT, messages=PROMPT, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        print(f"stream chunks: {len(pieces)}")
        print(f"stream: {''.join(pieces)}")
    except openai.APIStatusError as e:
        code = e.response.headers.get("keyward-error", "none (from the provider)")
        print(f"error: HTTP {e.status_code}, keyward-error: {code}: {e.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
