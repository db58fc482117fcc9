// The official OpenAI Node SDK talking to keyward over its Unix socket.
//
// The app holds only a keyward client token (kw_...), passed as the SDK's apiKey. keyward
// authenticates it, injects the real provider key and calls the provider over TLS; the
// provider key never enters this process.
//
//   KEYWARD_SOCKET=/run/keyward/keyward.sock KEYWARD_TOKEN=kw_... node openai_chat.mjs

import OpenAI from "openai";
import { Agent, fetch } from "undici";

const socketPath = process.env.KEYWARD_SOCKET;
const token = process.env.KEYWARD_TOKEN;
if (!socketPath || !token) {
  console.error("set KEYWARD_SOCKET (keyward's data socket) and KEYWARD_TOKEN (a kw_ client token)");
  process.exit(2);
}

const model = process.env.OPENAI_MODEL ?? "gpt-4o-mini";
const messages = [{ role: "user", content: "Say hello in one short sentence." }];

// undici's own fetch is passed with its Agent: Node's built-in fetch bundles a different
// undici version, and a dispatcher from one version is not guaranteed to work with the other.
// The host in baseURL is never dialled; the path prefix routes to keyward's `openai` target.
const agent = new Agent({ connect: { socketPath } });
const client = new OpenAI({
  apiKey: token,
  baseURL: "http://keyward/openai/v1",
  fetch,
  fetchOptions: { dispatcher: agent },
  maxRetries: 0,
});

try {
  // A normal call; the raw response also shows which audit record and key served it.
  const { data: completion, response } = await client.chat.completions
    .create({ model, messages })
    .withResponse();
  console.log(`keyward-call-id: ${response.headers.get("keyward-call-id")}`);
  console.log(`keyward-credential: ${response.headers.get("keyward-credential")}`);
  console.log(`chat: ${completion.choices[0].message.content}`);
  console.log(
    `usage: ${completion.usage.prompt_tokens} prompt, ${completion.usage.completion_tokens} completion`,
  );

  // A streaming call: keyward relays each server-sent event as it arrives.
  const pieces = [];
  const stream = await client.chat.completions.create({ model, messages, stream: true });
  for await (const chunk of stream) {
    const piece = chunk.choices[0]?.delta?.content;
    if (piece) pieces.push(piece);
  }
  console.log(`stream chunks: ${pieces.length}`);
  console.log(`stream: ${pieces.join("")}`);
} catch (err) {
  if (!(err instanceof OpenAI.APIError) || err.status === undefined) throw err;
  // keyward's own refusals carry a `keyward-error` code (unauthenticated, scope_denied, ...);
  // without it the status came from the provider.
  const code = err.headers?.get("keyward-error") ?? "none (from the provider)";
  console.error(`error: HTTP ${err.status}, keyward-error: ${code}: ${err.message}`);
  process.exitCode = 1;
} finally {
  await agent.close();
}
