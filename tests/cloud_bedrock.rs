//! Amazon Bedrock through the real binary: an unmodified boto3 `bedrock-runtime` client (access
//! key id = its keyward client token) calls Converse and ConverseStream through keyward's TCP
//! listener; keyward signs anew with the stored `aws-access-key` or with the session of an
//! `aws-assume-role` credential from moto's STS. The upstream is a TLS mock that recomputes every
//! SigV4 signature with botocore and refuses a bad one (tests/support/bedrock_mock.py).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::daemon::{Daemon, contains, random_key};

const REGION: &str = "us-east-1";
const MODEL: &str = "anthropic.claude-3-5-sonnet-20240620-v1:0";

fn venv_python() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin/python")
}

/// A random string of `n` characters from `alphabet`.
fn random_of(alphabet: &[u8], n: usize) -> String {
    let hex = random_key("");
    hex.as_bytes()
        .chunks(2)
        .take(n)
        .map(|p| {
            let v = u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap();
            alphabet[v as usize % alphabet.len()] as char
        })
        .collect()
}

/// The mock (Bedrock + moto STS) and its files.
struct Mock {
    child: Child,
    dir: tempfile::TempDir,
    bedrock: u16,
    sts: u16,
    ca: PathBuf,
}

impl Drop for Mock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mock {
    fn start(static_creds: Value, external_id: &str) -> Mock {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keyward bedrock test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf_params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&cert, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        let config = serde_json::json!({
            "cert": cert, "key": key, "region": REGION, "static": static_creds,
            "external_id": external_id, "out": dir.path(),
        });
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/bedrock_mock.py");
        let child = Command::new(venv_python())
            .arg(script)
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("mock.err")).unwrap())
            .spawn()
            .expect("start the bedrock mock");
        let ports = dir.path().join("ports.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ports.exists() {
            let err = std::fs::read_to_string(dir.path().join("mock.err")).unwrap_or_default();
            assert!(Instant::now() < deadline, "the mock did not start: {err}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let ports: Value = serde_json::from_slice(&std::fs::read(&ports).unwrap()).unwrap();
        Mock {
            child,
            bedrock: ports["bedrock"].as_u64().unwrap() as u16,
            sts: ports["sts"].as_u64().unwrap() as u16,
            dir,
            ca: ca_pem,
        }
    }

    /// Every request the mock received, in order.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn raw_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("requests.jsonl")).unwrap_or_default()
    }
}

/// Runs `code` in the venv's Python with `TOKEN` and `ENDPOINT` set; returns its stdout
/// (each line a JSON document).
fn python(code: &str, token: &str, endpoint: &str) -> (Vec<Value>, String) {
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(code)
        .env_clear()
        .env("TOKEN", token)
        .env("ENDPOINT", endpoint)
        .env("MODEL", MODEL)
        .output()
        .expect("run the venv's python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "python failed: {stderr}\n{stdout}");
    let docs = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (docs, format!("{stdout}\n{stderr}"))
}

/// The boto3 calls of the README's "Bedrock" section, then a denied model, then a raw request
/// that asks the mock to echo the credential's secrets inside an event-stream frame.
const APP: &str = r#"
import base64, json, os, http.client
import boto3, botocore
client = boto3.client(
    "bedrock-runtime",
    region_name="us-east-1",
    endpoint_url=os.environ["ENDPOINT"],
    aws_access_key_id=os.environ["TOKEN"],
    aws_secret_access_key="not-a-secret-keyward-ignores-it",
    aws_session_token="APP-SESSION-TOKEN-NEVER-FORWARDED",
)
messages = [{"role": "user", "content": [{"text": "Say hello"}]}]
r = client.converse(modelId=os.environ["MODEL"], messages=messages)
print(json.dumps({"converse": r["output"]["message"]["content"][0]["text"],
                  "usage": r["usage"],
                  "credential": r["ResponseMetadata"]["HTTPHeaders"].get("keyward-credential")}))
events = list(client.converse_stream(modelId=os.environ["MODEL"], messages=messages)["stream"])
text = "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e)
meta = [e["metadata"] for e in events if "metadata" in e]
print(json.dumps({"stream": text, "metadata": meta, "kinds": [list(e)[0] for e in events]}))
try:
    client.converse(modelId="meta.llama3-8b-instruct-v1:0", messages=messages)
    print(json.dumps({"denied": None}))
except botocore.exceptions.ClientError as e:
    print(json.dumps({"denied": e.response["ResponseMetadata"]["HTTPStatusCode"],
                      "error": e.response["ResponseMetadata"]["HTTPHeaders"].get("keyward-error")}))
host, port = os.environ["ENDPOINT"].split("//")[1].split("/")[0].split(":")
c = http.client.HTTPConnection(host, int(port), timeout=30)
c.request("POST", "/bedrock/model/" + os.environ["MODEL"].replace(":", "%3A") + "/converse-stream",
          body=json.dumps({"messages": [{"role": "user", "content": [{"text": "ECHO"}]}]}),
          headers={"content-type": "application/json",
                   "authorization": "AWS4-HMAC-SHA256 Credential=" + os.environ["TOKEN"]
                   + "/20261130/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=00",
                   "x-amz-date": "19990101T000000Z",
                   "x-amz-content-sha256": "APP-CONTENT-HASH-NEVER-FORWARDED",
                   "x-amz-security-token": "APP-SESSION-TOKEN-NEVER-FORWARDED"})
resp = c.getresponse()
raw = resp.read()
print(json.dumps({"echo_status": resp.status, "echo": base64.b64encode(raw).decode()}))
"#;

/// Prints the daemon's and the mock's logs when the test fails, for diagnosis.
struct ShowLogs<'a>(&'a Daemon, &'a Mock);

impl Drop for ShowLogs<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let err = std::fs::read_to_string(self.1.dir.path().join("mock.err"));
            eprintln!(
                "daemon:\n{}\n{}\nmock:\n{}",
                self.0.stdout(),
                self.0.stderr(),
                err.unwrap_or_default()
            );
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn skip_without_venv(test: &str) -> bool {
    !support::needs::program(test, venv_python().to_str().unwrap(), "--version")
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_converse_and_stream_are_signed_anew_with_access_keys_and_assumed_roles() {
    let test = "boto3_converse_and_stream_are_signed_anew";
    if skip_without_venv(test) {
        return;
    }
    let upper = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let akid = format!("AKIA{}", random_of(upper, 16));
    let secret = random_of(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        40,
    );
    let external_id = format!("ext-{}", random_of(b"abcdefghijklmnop", 12));
    let mock = Mock::start(
        serde_json::json!([{"akid": akid, "secret": secret}]),
        &external_id,
    );
    let port = free_port();
    let config = format!(
        "listen_tcp = \"127.0.0.1:{port}\"\n\n[targets.bedrock]\n\
         base_url = \"https://localhost:{}\"\nregion = \"{REGION}\"\n\
         sts_endpoint = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\n",
        mock.bedrock,
        mock.sts,
        mock.ca.display()
    );
    // keyward's own AWS identity, which assumes the roles (moto's STS accepts any).
    let own_secret = random_key("own-");
    let daemon = Daemon::builder()
        .config(&config)
        .env("AWS_ACCESS_KEY_ID", "AKIAKEYWARDOWNIDENTITY")
        .env("AWS_SECRET_ACCESS_KEY", &own_secret)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .start();
    let _logs = ShowLogs(&daemon, &mock);
    let doc = serde_json::json!({"access_key_id": akid, "secret_access_key": secret});
    let (token, cred) = daemon.provision(
        "acme",
        "bedrock",
        &doc.to_string(),
        &["--kind", "aws-access-key", "--model", "anthropic.*"],
    );
    let endpoint = format!("http://127.0.0.1:{port}/bedrock");
    let (out, transcript) = python(APP, &token, &endpoint);

    // Converse and ConverseStream answered through keyward, signed with the stored key.
    assert_eq!(out[0]["converse"], "hello from bedrock", "{transcript}");
    assert_eq!(out[0]["usage"]["inputTokens"], 12);
    assert!(
        out[0]["credential"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{cred}/v")),
        "{transcript}"
    );
    assert_eq!(out[1]["stream"], "hello from bedrock ", "{transcript}");
    assert_eq!(out[1]["metadata"][0]["usage"]["outputTokens"], 5);
    assert_eq!(
        out[1]["kinds"],
        serde_json::json!([
            "messageStart",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockDelta",
            "contentBlockStop",
            "messageStop",
            "metadata"
        ])
    );
    // A model outside the credential's glob is refused before the upstream is contacted.
    assert_eq!(out[2]["denied"], 403, "{transcript}");
    assert_eq!(out[2]["error"], "scope_denied");
    let requests = mock.requests();
    assert!(
        requests
            .iter()
            .all(|r| !r["path"].as_str().unwrap().contains("llama")),
        "{requests:?}"
    );
    // Every request the mock saw had a signature botocore accepts, by the stored key, over
    // the percent-encoded model id; none of the app's SigV4 headers got through.
    assert_eq!(requests.len(), 3, "{requests:?}");
    for r in &requests {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["akid"], akid.as_str());
        assert!(
            r["path"]
                .as_str()
                .unwrap()
                .starts_with("/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/"),
            "{r}"
        );
        let headers = r["headers"].as_array().unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .filter(|h| h[0] == name)
                .map(|h| h[1].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert!(header("x-amz-security-token").is_empty(), "{r}");
        assert!(header("x-amz-content-sha256").is_empty(), "{r}");
        assert_ne!(header("x-amz-date"), vec!["19990101T000000Z".to_string()]);
        assert_eq!(header("authorization").len(), 1);
    }
    let log = mock.raw_log();
    for never in [
        token.as_str(),
        "APP-SESSION-TOKEN-NEVER-FORWARDED",
        "APP-CONTENT-HASH-NEVER-FORWARDED",
        "not-a-secret-keyward-ignores-it",
    ] {
        assert!(!log.contains(never), "the upstream saw {never}");
    }
    // The secret echoed inside an event-stream frame reached the app redacted.
    use base64::Engine;
    let echoed = base64::engine::general_purpose::STANDARD
        .decode(out[3]["echo"].as_str().unwrap())
        .unwrap();
    assert_eq!(out[3]["echo_status"], 200, "{transcript}");
    assert!(contains(&echoed, "[REDACTED]"), "{transcript}");
    assert!(!contains(&echoed, &secret));

    // The audit has the usage of the Converse call: input with cache reads and writes.
    let completed_rows = || {
        daemon
            .json_lines(&["audit", "query", "--limit", "100"])
            .into_iter()
            .filter(|r| r["event"] == "request.completed" && r["model"] == MODEL)
            .collect::<Vec<Value>>()
    };
    let mut completed = completed_rows();
    for _ in 0..200 {
        if completed.len() == 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
        completed = completed_rows();
    }
    let rows = daemon.json_lines(&["audit", "query", "--limit", "100"]);
    assert_eq!(completed.len(), 3, "{rows:?}");
    for row in &completed {
        assert_eq!(row["input_tokens"], 17, "{row} in {completed:?}");
        assert_eq!(row["cached_input_tokens"], 3, "{row}");
        assert_eq!(row["output_tokens"], 5, "{row}");
    }

    // The same through an assumed role: moto's STS issues the session (with the external id),
    // the mock checks the signature with what STS issued, and the session secrets are scrubbed.
    let role = serde_json::json!({
        "role_arn": "arn:aws:iam::123456789012:role/bedrock-caller",
        "external_id": external_id,
    });
    let (token2, role_cred) = daemon.provision(
        "beta",
        "bedrock",
        &role.to_string(),
        &["--kind", "aws-assume-role"],
    );
    let (out2, transcript2) = python(APP, &token2, &endpoint);
    assert_eq!(out2[0]["converse"], "hello from bedrock", "{transcript2}");
    assert_eq!(out2[1]["stream"], "hello from bedrock ", "{transcript2}");
    assert_eq!(
        out2[2]["denied"],
        serde_json::Value::Null,
        "no model globs on this one"
    );
    let requests = mock.requests();
    let assumed: Vec<&Value> = requests.iter().skip(3).collect();
    assert_eq!(assumed.len(), 4, "{requests:?}");
    let derived_secret = assumed[0]["derived_secret"].as_str().unwrap().to_string();
    let derived_token = assumed[0]["derived_token"].as_str().unwrap().to_string();
    for r in &assumed {
        assert_eq!(r["verified"], true, "{r}");
        assert!(r["akid"].as_str().unwrap().starts_with("ASIA"), "{r}");
        // One STS call served every request: the session came from the cache.
        assert_eq!(r["derived_secret"], derived_secret.as_str());
    }
    let echoed = base64::engine::general_purpose::STANDARD
        .decode(out2[3]["echo"].as_str().unwrap())
        .unwrap();
    assert!(contains(&echoed, "[REDACTED]"), "{transcript2}");
    assert!(!contains(&echoed, &derived_secret));
    assert!(!contains(&echoed, &derived_token));
    // Deleting the role's credential drops its session from memory at once.
    let sessions = || {
        let text = daemon.ok(&["metrics"]);
        text.lines()
            .find_map(|l| l.strip_prefix("keyward_derived_secrets{kind=\"aws_session\"} "))
            .map(|n| n.trim().to_string())
    };
    assert_eq!(sessions().as_deref(), Some("1"));
    daemon.ok(&["cred", "delete", &role_cred]);
    assert_eq!(sessions().as_deref(), Some("0"));

    // No secret anywhere the app, the operator or the disk can see.
    let logs = format!("{}\n{}", daemon.stdout(), daemon.stderr());
    let audit = format!("{rows:?}");
    let state = daemon.all_state_bytes();
    for s in [&secret, &derived_secret, &derived_token, &own_secret] {
        for (name, text) in [
            ("app", transcript.as_str()),
            ("app2", transcript2.as_str()),
            ("logs", logs.as_str()),
            ("audit", audit.as_str()),
        ] {
            assert!(!text.contains(s.as_str()), "{name} shows a secret");
        }
        assert!(
            !contains(&state, s),
            "the state directory holds a secret in plaintext"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_or_failed_assume_role_is_refused_with_the_reason_and_no_secret() {
    let test = "a_wrong_secret_or_failed_assume_role";
    if skip_without_venv(test) {
        return;
    }
    let upper = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let akid = format!("AKIA{}", random_of(upper, 16));
    let secret = random_of(b"abcdefghijklmnopqrstuvwxyz0123456789", 40);
    let wrong = random_of(b"abcdefghijklmnopqrstuvwxyz0123456789", 40);
    let mock = Mock::start(
        serde_json::json!([{"akid": akid, "secret": secret}]),
        "expected",
    );
    let port = free_port();
    // STS at a port nobody listens on.
    let dead = free_port();
    let config = format!(
        "listen_tcp = \"127.0.0.1:{port}\"\n\n[targets.bedrock]\n\
         base_url = \"https://localhost:{}\"\nregion = \"{REGION}\"\n\
         sts_endpoint = \"https://127.0.0.1:{dead}\"\nca_file = \"{}\"\n",
        mock.bedrock,
        mock.ca.display()
    );
    let daemon = Daemon::builder()
        .config(&config)
        .env("AWS_ACCESS_KEY_ID", "AKIAKEYWARDOWNIDENTITY")
        .env("AWS_SECRET_ACCESS_KEY", "own-identity-secret")
        .start();
    let _logs = ShowLogs(&daemon, &mock);
    let doc = serde_json::json!({"access_key_id": akid, "secret_access_key": wrong});
    let (token, _) = daemon.provision(
        "acme",
        "bedrock",
        &doc.to_string(),
        &["--kind", "aws-access-key"],
    );
    let code = r#"
import json, os, boto3, botocore
client = boto3.client("bedrock-runtime", region_name="us-east-1",
    endpoint_url=os.environ["ENDPOINT"], aws_access_key_id=os.environ["TOKEN"],
    aws_secret_access_key="x", config=botocore.config.Config(retries={"max_attempts": 1}))
try:
    client.converse(modelId=os.environ["MODEL"],
                    messages=[{"role": "user", "content": [{"text": "hi"}]}])
    print(json.dumps({"status": 200}))
except botocore.exceptions.ClientError as e:
    print(json.dumps({"status": e.response["ResponseMetadata"]["HTTPStatusCode"],
                      "error": e.response["Error"], "keyward":
                      e.response["ResponseMetadata"]["HTTPHeaders"].get("keyward-error")}))
import http.client
host, port = os.environ["ENDPOINT"].split("//")[1].split("/")[0].split(":")
c = http.client.HTTPConnection(host, int(port), timeout=30)
c.request("POST", "/bedrock/model/" + os.environ["MODEL"] + "/converse", body="{}",
          headers={"authorization": "AWS4-HMAC-SHA256 Credential=" + os.environ["TOKEN"]
                   + "/20261130/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=0"})
r = c.getresponse()
print(json.dumps({"raw_status": r.status, "raw": r.read().decode()}))
"#;
    let endpoint = format!("http://127.0.0.1:{port}/bedrock");
    // The mock refuses the signature made with the wrong secret, like Bedrock does.
    let (out, transcript) = python(code, &token, &endpoint);
    assert_eq!(out[0]["status"], 403, "{transcript}");
    assert!(
        mock.requests()
            .iter()
            .all(|r| r["verified"] == false && r["why"].as_str().unwrap().contains("signature")),
        "{:?}",
        mock.requests()
    );
    // An assumed role whose STS cannot be reached: 502 naming the endpoint and the role.
    let role = serde_json::json!({"role_arn": "arn:aws:iam::123456789012:role/r"});
    let (token2, _) = daemon.provision(
        "beta",
        "bedrock",
        &role.to_string(),
        &["--kind", "aws-assume-role"],
    );
    let (out, transcript) = python(code, &token2, &endpoint);
    assert_eq!(out[0]["status"], 502, "{transcript}");
    assert_eq!(out[0]["keyward"], "upstream_unreachable");
    assert!(
        transcript.contains(&format!("127.0.0.1:{dead}"))
            && transcript.contains("arn:aws:iam::123456789012:role/r"),
        "{transcript}"
    );
    let logs = format!("{}\n{}", daemon.stdout(), daemon.stderr());
    for s in [secret.as_str(), wrong.as_str(), "own-identity-secret"] {
        assert!(!transcript.contains(s) && !logs.contains(s));
    }
}

/// keyward's config for a TCP listener on `port` and a bedrock target at the mock.
fn bedrock_config(port: u16, mock: &Mock) -> String {
    format!(
        "listen_tcp = \"127.0.0.1:{port}\"\n\n[targets.bedrock]\n\
         base_url = \"https://localhost:{}\"\nregion = \"{REGION}\"\n\
         sts_endpoint = \"https://127.0.0.1:{}\"\nca_file = \"{}\"\n",
        mock.bedrock,
        mock.sts,
        mock.ca.display()
    )
}

/// A random static key the mock accepts, as (access key id, secret).
fn static_key() -> (String, String) {
    let akid = format!("AKIA{}", random_of(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16));
    let secret = random_of(b"abcdefghijklmnopqrstuvwxyz0123456789", 40);
    (akid, secret)
}

/// `keyward cred test` on a Bedrock credential: ListAsyncInvokes, signed with the stored key
/// (the mock recomputes the signature); a key with the wrong secret is refused 403, and the test
/// names that version, says why, and exits 1.
#[tokio::test(flavor = "multi_thread")]
async fn cred_test_signs_list_async_invokes_and_names_a_refused_key() {
    let test = "cred_test_signs_list_async_invokes_and_names_a_refused_key";
    if skip_without_venv(test) {
        return;
    }
    let (akid, secret) = static_key();
    let (_, wrong) = static_key();
    let mock = Mock::start(
        serde_json::json!([{"akid": akid, "secret": secret}]),
        "expected",
    );
    let daemon = Daemon::builder()
        .config(&bedrock_config(free_port(), &mock))
        .start();
    let _logs = ShowLogs(&daemon, &mock);
    let mut printed = String::new();
    let mut test_cred = |doc: Value| {
        let (_, id) = daemon.provision(
            "acme",
            "bedrock",
            &doc.to_string(),
            &["--kind", "aws-access-key"],
        );
        let out = daemon.cli(&["cred", "test", &id, "--json"]);
        let (stdout, stderr) = (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        );
        printed.push_str(&stdout);
        printed.push_str(&stderr);
        let answer: Value = serde_json::from_str(stdout.trim()).unwrap();
        (id, out.status.code(), answer, stderr)
    };

    let (id, code, answer, stderr) =
        test_cred(serde_json::json!({"access_key_id": akid, "secret_access_key": secret}));
    assert_eq!(code, Some(0), "{answer}\n{stderr}");
    assert_eq!(answer["status"], 200);
    assert_eq!(answer["id"], id.as_str());
    assert_eq!(answer["request"], "GET /async-invoke?maxResults=1");
    let seen = mock.requests().pop().unwrap();
    assert_eq!(
        (
            &seen["method"],
            &seen["path"],
            &seen["verified"],
            &seen["akid"]
        ),
        (
            &Value::from("GET"),
            &Value::from("/async-invoke?maxResults=1"),
            &Value::from(true),
            &Value::from(akid.as_str())
        ),
        "{seen}"
    );

    let (bad_id, code, answer, stderr) =
        test_cred(serde_json::json!({"access_key_id": akid, "secret_access_key": wrong}));
    assert_eq!(code, Some(1), "{answer}");
    assert_eq!(
        (answer["status"].as_u64(), answer["version"].as_u64()),
        (Some(403), Some(1))
    );
    assert_eq!(answer["id"], bad_id.as_str());
    assert!(
        stderr.contains("the provider refused the key (403)")
            && stderr.contains("bedrock:ListAsyncInvokes"),
        "{stderr}"
    );
    let seen = mock.requests().pop().unwrap();
    assert_eq!(seen["verified"], false, "{seen}");
    let rows = daemon.json_lines(&[
        "audit",
        "query",
        "--call-id",
        answer["call_id"].as_str().unwrap(),
    ]);
    assert!(
        rows.iter().any(|r| r["event"] == "request.completed"
            && r["upstream_status"] == 403
            && r["credential_id"] == bad_id.as_str()
            && r["client_id"] == "operator"),
        "{rows:?}"
    );
    let logs = format!("{}\n{}", daemon.stdout(), daemon.stderr());
    for s in [secret.as_str(), wrong.as_str()] {
        assert!(!printed.contains(s) && !logs.contains(s) && !mock.raw_log().contains(s));
    }
}

/// An inference profile ARN: boto3 sends it as one path segment, `:` and `/` percent-encoded.
const PROFILE_ARN: &str = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/\
                           us.anthropic.claude-3-5-sonnet-20240620-v1:0";

#[tokio::test(flavor = "multi_thread")]
async fn boto3_calls_an_inference_profile_arn_and_steering_through_the_id_is_refused() {
    let test = "boto3_calls_an_inference_profile_arn";
    if skip_without_venv(test) {
        return;
    }
    let (akid, secret) = static_key();
    let mock = Mock::start(
        serde_json::json!([{"akid": akid, "secret": secret}]),
        "unused",
    );
    let port = free_port();
    let daemon = Daemon::builder()
        .config(&bedrock_config(port, &mock))
        .start();
    let _logs = ShowLogs(&daemon, &mock);
    let doc = serde_json::json!({"access_key_id": akid, "secret_access_key": secret});
    let (token, cred) = daemon.provision(
        "acme",
        "bedrock",
        &doc.to_string(),
        &[
            "--kind",
            "aws-access-key",
            "--model",
            "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.*",
        ],
    );
    let code = r#"
import json, os, http.client, boto3, botocore
client = boto3.client("bedrock-runtime", region_name="us-east-1",
    endpoint_url=os.environ["ENDPOINT"], aws_access_key_id=os.environ["TOKEN"],
    aws_secret_access_key="x", config=botocore.config.Config(retries={"max_attempts": 1}))
messages = [{"role": "user", "content": [{"text": "hi"}]}]
r = client.converse(modelId=os.environ["MODEL"], messages=messages)
print(json.dumps({"text": r["output"]["message"]["content"][0]["text"],
                  "credential": r["ResponseMetadata"]["HTTPHeaders"].get("keyward-credential")}))
try:
    client.converse(modelId=os.environ["MODEL"].replace("us.anthropic", "us.meta"),
                    messages=messages)
    print(json.dumps({"status": 200}))
except botocore.exceptions.ClientError as e:
    print(json.dumps({"status": e.response["ResponseMetadata"]["HTTPStatusCode"],
                      "keyward": e.response["ResponseMetadata"]["HTTPHeaders"].get("keyward-error")}))
host, port = os.environ["ENDPOINT"].split("//")[1].split("/")[0].split(":")
for path in ["/bedrock/model/arn%3Aaws%2F..%2F..%2Fguardrail/converse",
             "/bedrock/model/arn%3Aaws%2F.%2Fx/converse",
             "/bedrock/model/arn%3Aaws%252Fx/converse",
             "/bedrock/model/x/converse%2F..%2Fy",
             "/bedrock/model%2Fx/y/converse",
             "/bedrock/model/arn%3Aaws%2F%2Fx/converse"]:
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("POST", path, body="{}", headers={"authorization": "AWS4-HMAC-SHA256 Credential="
              + os.environ["TOKEN"] + "/20261130/us-east-1/bedrock/aws4_request, "
              + "SignedHeaders=host, Signature=0"})
    resp = c.getresponse()
    print(json.dumps({"path": path, "status": resp.status,
                      "keyward": resp.getheader("keyward-error"), "body": resp.read().decode()}))
"#;
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(code)
        .env_clear()
        .env("TOKEN", &token)
        .env("ENDPOINT", format!("http://127.0.0.1:{port}/bedrock"))
        .env("MODEL", PROFILE_ARN)
        .output()
        .unwrap();
    let transcript = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{transcript}");
    let docs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Converse by ARN reached the mock, signed over the path as boto3 encoded it.
    assert_eq!(docs[0]["text"], "hello from bedrock", "{transcript}");
    assert!(
        docs[0]["credential"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{cred}/v")),
        "{transcript}"
    );
    // A profile outside the credential's glob (matched against the decoded ARN) is refused.
    assert_eq!(docs[1]["status"], 403, "{transcript}");
    assert_eq!(docs[1]["keyward"], "scope_denied");
    // Steering through the model id: dot segments, a doubled or twice-encoded slash, an
    // encoded slash outside the id. Each is refused before any credential is looked at.
    for d in &docs[2..] {
        assert_eq!(d["status"], 400, "{d}");
        assert_eq!(d["keyward"], "bad_request", "{d}");
    }
    assert_eq!(docs.len(), 8, "{transcript}");
    let requests = mock.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0]["verified"], true, "{}", requests[0]);
    assert_eq!(
        requests[0]["path"],
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2F\
         us.anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    );
    // The audit names the decoded ARN as the model, for the served call and the denied one.
    let rows = daemon.json_lines(&["audit", "query", "--limit", "100"]);
    assert!(
        rows.iter()
            .any(|r| r["event"] == "request.resolved" && r["model"] == PROFILE_ARN),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r["event"] == "request.denied"
            && r["model"] == PROFILE_ARN.replace("us.anthropic", "us.meta")),
        "{rows:?}"
    );
}

/// InvokeModelWithResponseStream: the first event reaches boto3 while the mock still holds
/// the rest of the stream back; a secret the model echoes inside a chunk's base64 `bytes`, or
/// in a ConverseStream delta, reaches boto3 as `[REDACTED]` in a message whose checksums boto3
/// accepts; the usage of the stream comes from its `amazon-bedrock-invocationMetrics`.
#[tokio::test(flavor = "multi_thread")]
async fn boto3_invoke_stream_passes_events_as_they_come_and_scrubs_inside_them() {
    let test = "boto3_invoke_stream_passes_events_as_they_come";
    if skip_without_venv(test) {
        return;
    }
    let (akid, secret) = static_key();
    let mock = Mock::start(
        serde_json::json!([{"akid": akid, "secret": secret}]),
        "unused",
    );
    let port = free_port();
    let daemon = Daemon::builder()
        .config(&bedrock_config(port, &mock))
        .start();
    let _logs = ShowLogs(&daemon, &mock);
    let doc = serde_json::json!({"access_key_id": akid, "secret_access_key": secret});
    let (token, _) = daemon.provision(
        "acme",
        "bedrock",
        &doc.to_string(),
        &["--kind", "aws-access-key"],
    );
    let code = r#"
import json, os, time, boto3, botocore
client = boto3.client("bedrock-runtime", region_name="us-east-1",
    endpoint_url=os.environ["ENDPOINT"], aws_access_key_id=os.environ["TOKEN"],
    aws_secret_access_key="x", config=botocore.config.Config(retries={"max_attempts": 1}))
def invoke_stream(text, hold):
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
            "messages": [{"role": "user", "content": text}], "hold": hold}
    r = client.invoke_model_with_response_stream(modelId=os.environ["MODEL"],
                                                 body=json.dumps(body))
    events, released = [], False
    for e in r["body"]:
        events.append(json.loads(e["chunk"]["bytes"]))
        if hold and not released:
            # Seen while the mock still holds every later event back.
            open(os.environ["RELEASE"], "w").close()
            released = True
    return events
events = invoke_stream("hi", True)
print(json.dumps({"held": [e["type"] for e in events],
                  "text": "".join(e["delta"]["text"] for e in events
                                  if e["type"] == "content_block_delta")}))
events = invoke_stream("ECHO", False)
print(json.dumps({"echo": "".join(e["delta"]["text"] for e in events
                                  if e["type"] == "content_block_delta")}))
messages = [{"role": "user", "content": [{"text": "ECHO"}]}]
events = list(client.converse_stream(modelId=os.environ["MODEL"], messages=messages)["stream"])
print(json.dumps({"converse_echo": "".join(e["contentBlockDelta"]["delta"]["text"]
                                           for e in events if "contentBlockDelta" in e),
                  "metadata": [e["metadata"]["usage"] for e in events if "metadata" in e]}))
"#;
    let release = mock.dir.path().join("release");
    let out = Command::new(venv_python())
        .arg("-c")
        .arg(code)
        .env_clear()
        .env("TOKEN", &token)
        .env("ENDPOINT", format!("http://127.0.0.1:{port}/bedrock"))
        .env("MODEL", MODEL)
        .env("RELEASE", &release)
        .output()
        .unwrap();
    let transcript = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{transcript}");
    let docs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Every event arrived, and the first one before the mock let go of the rest.
    assert_eq!(docs[0]["text"], "hello from bedrock ", "{transcript}");
    assert_eq!(
        docs[0]["held"],
        serde_json::json!([
            "message_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "message_stop"
        ])
    );
    let holds = std::fs::read_to_string(mock.dir.path().join("holds.jsonl")).unwrap();
    assert_eq!(holds.trim(), r#"{"released": true}"#, "{holds}");
    // The echoed secret came back redacted inside messages boto3 checked and decoded.
    for (name, text) in [
        ("invoke", docs[1]["echo"].as_str().unwrap()),
        ("converse", docs[2]["converse_echo"].as_str().unwrap()),
    ] {
        assert!(
            text.starts_with("hello from bedrock [REDACTED]"),
            "{name}: {text}"
        );
        assert!(!text.contains(&secret), "{name}");
    }
    assert_eq!(docs[2]["metadata"][0]["outputTokens"], 5);
    assert!(!transcript.contains(&secret));
    // The usage of both InvokeModel streams, from the invocation metrics of their last chunk.
    let invoke_rows = || {
        daemon
            .json_lines(&["audit", "query", "--limit", "100"])
            .into_iter()
            .filter(|r| r["event"] == "request.completed")
            .collect::<Vec<Value>>()
    };
    let mut rows = invoke_rows();
    for _ in 0..200 {
        if rows.len() == 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
        rows = invoke_rows();
    }
    assert_eq!(rows.len(), 3, "{rows:?}");
    let tokens = |r: &Value| (r["input_tokens"].clone(), r["output_tokens"].clone());
    let invoke: Vec<_> = rows
        .iter()
        .filter(|r| r["input_tokens"] == 21)
        .map(tokens)
        .collect();
    assert_eq!(
        invoke,
        vec![(21.into(), 7.into()), (21.into(), 7.into())],
        "{rows:?}"
    );
    let requests = mock.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(requests.iter().all(|r| r["verified"] == true));
}

/// Two static keys for one tenant: the first (priority 1) carries a session token Bedrock calls
/// expired, the second signs correctly. The 403 moves the call to the second key before a byte
/// reaches the app, quarantines the first, and the audit shows both; the next call goes
/// straight to the second key.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_signature_fails_over_to_the_next_aws_key_and_both_are_audited() {
    let test = "a_refused_signature_fails_over_to_the_next_aws_key";
    if skip_without_venv(test) {
        return;
    }
    let (akid1, secret1) = static_key();
    let (akid2, secret2) = static_key();
    let live_token = random_of(b"abcdefghijklmnopqrstuvwxyz0123456789", 32);
    let stale_token = random_of(b"abcdefghijklmnopqrstuvwxyz0123456789", 32);
    let mock = Mock::start(
        serde_json::json!([
            {"akid": akid1, "secret": secret1, "token": live_token},
            {"akid": akid2, "secret": secret2},
        ]),
        "unused",
    );
    let port = free_port();
    let daemon = Daemon::builder()
        .config(&bedrock_config(port, &mock))
        .start();
    let _logs = ShowLogs(&daemon, &mock);
    let stale = serde_json::json!({
        "access_key_id": akid1, "secret_access_key": secret1, "session_token": stale_token,
    });
    let (token, first) = daemon.provision(
        "acme",
        "bedrock",
        &stale.to_string(),
        &["--kind", "aws-access-key", "--priority", "1"],
    );
    let good = serde_json::json!({"access_key_id": akid2, "secret_access_key": secret2});
    let out = daemon.cli_stdin(
        &[
            "cred",
            "add",
            "--tenant",
            "acme",
            "--target",
            "bedrock",
            "--name",
            "second",
            "--kind",
            "aws-access-key",
            "--priority",
            "2",
            "--json",
        ],
        Some(good.to_string().as_bytes()),
    );
    assert!(out.status.success(), "{out:?}");
    let second: Value = serde_json::from_slice(&out.stdout).unwrap();
    let second = second["id"].as_str().unwrap().to_string();
    let code = r#"
import json, os, boto3, botocore
client = boto3.client("bedrock-runtime", region_name="us-east-1",
    endpoint_url=os.environ["ENDPOINT"], aws_access_key_id=os.environ["TOKEN"],
    aws_secret_access_key="x", config=botocore.config.Config(retries={"max_attempts": 1}))
for _ in range(2):
    r = client.converse(modelId=os.environ["MODEL"],
                        messages=[{"role": "user", "content": [{"text": "hi"}]}])
    print(json.dumps({"text": r["output"]["message"]["content"][0]["text"],
                      "credential": r["ResponseMetadata"]["HTTPHeaders"]["keyward-credential"]}))
"#;
    let (docs, transcript) = python(code, &token, &format!("http://127.0.0.1:{port}/bedrock"));
    for d in &docs {
        assert_eq!(d["text"], "hello from bedrock", "{transcript}");
        assert_eq!(d["credential"], format!("{second}/v1"), "{transcript}");
    }
    let requests = mock.requests();
    let seen: Vec<(&str, bool)> = requests
        .iter()
        .map(|r| {
            (
                r["akid"].as_str().unwrap_or("refused"),
                r["verified"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("refused", false),
            (akid2.as_str(), true),
            (akid2.as_str(), true)
        ],
        "{requests:?}"
    );
    assert!(
        requests[0]["why"]
            .as_str()
            .unwrap()
            .starts_with("ExpiredTokenException"),
        "{}",
        requests[0]
    );
    let mut rows = daemon.json_lines(&["audit", "query", "--limit", "100"]);
    rows.sort_by_key(|r| r["seq"].as_u64());
    let of = |event: &str| -> Vec<&Value> { rows.iter().filter(|r| r["event"] == event).collect() };
    let failovers = of("request.failover");
    assert_eq!(failovers.len(), 1, "{rows:?}");
    assert_eq!(failovers[0]["credential_id"], first.as_str());
    assert_eq!(failovers[0]["upstream_status"], 403);
    let detail = failovers[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("from {first}/v1 to {second}/v1")),
        "{detail}"
    );
    let quarantined = of("credential.quarantined");
    assert_eq!(quarantined.len(), 1, "{rows:?}");
    assert_eq!(quarantined[0]["credential_id"], first.as_str());
    let resolved = of("request.resolved");
    assert_eq!(resolved.len(), 2, "{rows:?}");
    assert_eq!(resolved[0]["credential_id"], first.as_str());
    assert_eq!(
        resolved[1]["credential_id"],
        second.as_str(),
        "quarantined key skipped"
    );
    let text = format!(
        "{rows:?}\n{}\n{}\n{transcript}",
        daemon.stdout(),
        daemon.stderr()
    );
    for s in [&secret1, &secret2, &stale_token, &live_token] {
        assert!(!text.contains(s.as_str()), "a secret leaked");
    }
}
