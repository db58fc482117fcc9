//! keyward, fully offline: a local TLS mock of an OpenAI-compatible provider, a keyward with a
//! temporary home whose `openai` target points at it, a sealed demo key, and an app making a
//! normal and a streaming chat call through the Unix socket. It prints what the app received
//! beside what the provider received.
//!
//! Run: `cargo run --release --example demo`

#[path = "../tests/support/mock_upstream.rs"]
mod mock_upstream;

use std::path::Path;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use keyward::admin::WireSecret;
use keyward::admin::api::{clients::NewClient, credentials::NewCredential, tenants::NewTenant};
use keyward::config::Config;
use keyward::daemon::Server;
use keyward::seal::{MasterKey, Secret};
use mock_upstream::{MockUpstream, key_of};
use serde_json::Value;
use tokio::net::UnixStream;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mock = MockUpstream::builder().start().await;
    let home = tempfile::Builder::new()
        .prefix("keyward-demo")
        .tempdir_in("/tmp")?;
    let ca = mock.write_ca(home.path());
    let toml = format!(
        "[targets.openai]\nbase_url = \"{}\"\nca_file = \"{}\"\n",
        mock.base_url(),
        ca.display()
    );
    let home_str = home.path().display().to_string();
    let env = move |name: &str| (name == "KEYWARD_HOME").then(|| home_str.clone());
    let config = Config::from_toml(&toml, &home.path().join("keyward.toml"), &env)?;
    let (socket, admin) = (config.socket.clone(), config.admin_socket.clone());

    println!("keyward demo — everything runs on this machine\n");
    println!(
        "  provider (mock)  {} (TLS with a throwaway CA)",
        mock.base_url()
    );
    println!("  keyward home     {}", home.path().display());
    println!("  data socket      {}", socket.display());
    let server = Server::open(
        config,
        MasterKey::generate().into(),
        "secret pages".into(),
        tokio::runtime::Handle::current(),
    )?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
        "demo finished"
    }));

    // The operator's side, over the admin socket (what `keyward tenant add` etc. send).
    let demo_key = format!("sk-demo-{}", random_hex(20));
    println!("\n1. operator: keyward tenant add demo");
    admin_call(
        &admin,
        "POST",
        "/v1/tenants",
        serde_json::to_vec(&NewTenant {
            name: "demo".into(),
            max_key_age_s: None,
            on_expiry: None,
            rotation_overlap_s: None,
        })?,
    )
    .await?;
    println!("   operator: keyward client add --tenant demo --name chat-app");
    let client = admin_call(
        &admin,
        "POST",
        "/v1/clients",
        serde_json::to_vec(&NewClient {
            tenant: "demo".into(),
            name: "chat-app".into(),
            team: None,
            uid: None,
            workflows: vec![],
        })?,
    )
    .await?;
    let token = client["token"]
        .as_str()
        .context("client token")?
        .to_string();
    println!(
        "   operator: printf %s \"$KEY\" | keyward cred add --tenant demo --target openai --name main --model 'gpt-4o*'"
    );
    let cred = admin_call(
        &admin,
        "POST",
        "/v1/credentials",
        serde_json::to_vec(&NewCredential {
            tenant: "demo".into(),
            target: "openai".into(),
            name: "main".into(),
            models: vec!["gpt-4o*".into()],
            capabilities: vec![],
            teams: vec![],
            workflows: vec![],
            priority: None,
            kind: None,
            secret: WireSecret(Secret::from_slice(demo_key.as_bytes())),
        })?,
    )
    .await?;
    println!(
        "   sealed as {} v{} (preview {})",
        cred["id"].as_str().unwrap_or("?"),
        cred["version"],
        cred["preview"].as_str().unwrap_or("?")
    );

    // The app's side: an ordinary OpenAI request with its keyward token where the key would go.
    println!(
        "\n2. app: POST /openai/v1/chat/completions  (Authorization: Bearer {}…)",
        &token[..10]
    );
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#;
    let (status, headers, text) = app_call(&socket, &token, body).await?;
    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    println!(
        "   app received   {status}, \"{}\"",
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or(&text)
    );
    println!(
        "                  keyward-credential: {}",
        headers
            .get("keyward-credential")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    );
    report_upstream(&mock, &demo_key, &token)?;
    if text.contains(&demo_key) {
        bail!("the app saw the provider key");
    }

    println!("\n3. app: the same call with \"stream\": true (server-sent events)");
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello"}]}"#;
    let (status, _, text) = app_call(&socket, &token, body).await?;
    let events = text.lines().filter(|l| l.starts_with("data: ")).count();
    println!(
        "   app received   {status}, {events} SSE events, ending with {:?}",
        text.lines()
            .rfind(|l| l.starts_with("data: "))
            .unwrap_or("")
    );
    report_upstream(&mock, &demo_key, &token)?;

    println!("\n4. a provider that echoes the key back (POST /openai/leak)");
    let body = r#"{"model":"gpt-4o-mini"}"#;
    let (_, headers, text) = app_call_path(&socket, &token, "/openai/leak?split=7", body).await?;
    println!(
        "   app received   {:?} and x-debug-key: {}",
        text.trim(),
        headers
            .get("x-debug-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    );
    if text.contains(&demo_key) {
        bail!("the app saw the provider key");
    }

    println!("\n5. the audit trail (keyward audit query):");
    let rows = admin_call(&admin, "GET", "/v1/audit/events", Vec::new()).await?;
    for row in rows.as_array().into_iter().flatten().rev() {
        println!(
            "   #{:<3} {:<20} {} {} {}",
            row["seq"],
            row["event"].as_str().unwrap_or(""),
            row["credential_id"].as_str().unwrap_or(""),
            row["upstream_status"]
                .as_u64()
                .map(|s| format!("status {s}"))
                .unwrap_or_default(),
            row["total_tokens"]
                .as_u64()
                .map(|t| format!("{t} tokens"))
                .unwrap_or_default()
        );
    }
    let verify = admin_call(&admin, "GET", "/v1/audit/verify", Vec::new()).await?;
    println!(
        "   keyward audit verify: ok={} rows={}",
        verify["ok"], verify["rows_checked"]
    );

    let _ = stop_tx.send(());
    running.await??;
    println!("\nThe app never held the key; the provider never saw the app's token.");
    Ok(())
}

fn report_upstream(mock: &MockUpstream, demo_key: &str, token: &str) -> anyhow::Result<()> {
    let seen = mock.last_request().context("the provider saw no request")?;
    let injected = key_of(&seen).unwrap_or_default();
    println!(
        "   provider saw   Authorization: Bearer {}…{} ({})",
        &injected[..injected.len().min(8)],
        &injected[injected.len().saturating_sub(4)..],
        if injected == demo_key {
            "the sealed key, injected by keyward"
        } else {
            "NOT the sealed key"
        }
    );
    if injected != demo_key
        || seen.headers.iter().any(|(_, v)| {
            v.as_bytes()
                .windows(token.len())
                .any(|w| w == token.as_bytes())
        })
    {
        bail!("injection check failed");
    }
    Ok(())
}

/// One call of the admin API (README, "Admin API"), what `keyward tenant add` etc. send.
async fn admin_call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<Value> {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "keyward")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let (status, _, text) = send(socket, req)
        .await
        .with_context(|| format!("admin socket {}", socket.display()))?;
    if !(200..300).contains(&status) {
        bail!("admin refused ({status}): {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

async fn app_call(
    socket: &Path,
    token: &str,
    body: &str,
) -> anyhow::Result<(u16, http::HeaderMap, String)> {
    app_call_path(socket, token, "/openai/v1/chat/completions", body).await
}

async fn app_call_path(
    socket: &Path,
    token: &str,
    path: &str,
    body: &str,
) -> anyhow::Result<(u16, http::HeaderMap, String)> {
    let req = http::Request::post(path)
        .header("host", "keyward")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    send(socket, req).await
}

async fn send(
    socket: &Path,
    req: http::Request<Full<Bytes>>,
) -> anyhow::Result<(u16, http::HeaderMap, String)> {
    let stream = UnixStream::connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    keyward::seal::fill_random(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
