//! `provider = "aws-kms"`: the master key is a symmetric AWS KMS key, used through the KMS JSON
//! API (`TrentService.Encrypt` / `TrentService.Decrypt`, AWS KMS API Reference) over HTTPS,
//! signed with SigV4 (service `kms`). Each wrap binds its purpose (and tenant) as the KMS
//! `EncryptionContext` ([`Purpose::encryption_context`]); a wrapped key is KMS's
//! `CiphertextBlob`. The key's bytes never enter this process.
//!
//! AWS credentials come from the chain of the AWS SDKs, in their order: the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), a web identity token
//! (`AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`, STS `AssumeRoleWithWebIdentity`), container
//! credentials (`AWS_CONTAINER_CREDENTIALS_FULL_URI` or `..._RELATIVE_URI`, with
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]`), then IMDSv2. Secret values are held in locked
//! memory and never logged; session credentials are cached until five minutes before they
//! expire.
//!
//! Calls block the calling thread (plain HTTP/1.1, one connection per call: the provider is
//! asked once per tenant per process).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use zeroize::Zeroizing;

use crate::config::EnvLookup;
use crate::seal::{Kek, Purpose, SealError, Secret};

const PROVIDER: &str = "aws-kms";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// Session credentials are renewed this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// Largest response read from KMS, STS or a credentials endpoint.
const MAX_RESPONSE: usize = 1 << 20;

/// Where the key is: the config's `[master_key]` settings for `provider = "aws-kms"`.
#[derive(Debug, Clone)]
pub struct AwsKmsSettings {
    /// Key ARN, key id or `alias/NAME`.
    pub key_id: String,
    /// AWS region, e.g. `eu-west-1`.
    pub region: String,
    /// `https://HOST[:PORT]`; default `https://kms.<region>.amazonaws.com`.
    pub endpoint: Option<String>,
    /// PEM CA bundle trusted besides the web PKI roots (for KMS and STS).
    pub ca_file: Option<PathBuf>,
}

/// A symmetric AWS KMS key.
pub struct AwsKmsKek {
    settings: AwsKmsSettings,
    endpoint: Url,
    /// The key's ARN as KMS reports it (resolved at open from `key_id`).
    arn: String,
    tls: Arc<rustls::ClientConfig>,
    credentials: CredentialChain,
}

fn unreachable(reason: String, hint: impl Into<String>) -> SealError {
    SealError::Unreachable {
        provider: PROVIDER,
        reason,
        hint: hint.into(),
    }
}

impl AwsKmsKek {
    /// Finds credentials, resolves the key's ARN with one `Encrypt` (which proves the key is
    /// reachable and usable), and returns the provider. Fails with [`SealError::Unreachable`]
    /// naming what failed and what to check (never a secret).
    pub fn open(settings: AwsKmsSettings) -> Result<AwsKmsKek, SealError> {
        AwsKmsKek::open_with_env(settings, &crate::config::process_env)
    }

    /// [`AwsKmsKek::open`] with the credential chain's variables (`AWS_ACCESS_KEY_ID`, ...)
    /// read through `env` instead of the process environment.
    pub fn open_with_env(
        settings: AwsKmsSettings,
        env: EnvLookup<'_>,
    ) -> Result<AwsKmsKek, SealError> {
        let endpoint_text = settings
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://kms.{}.amazonaws.com", settings.region));
        let endpoint = Url::parse(&endpoint_text)
            .and_then(|u| {
                if u.tls {
                    Ok(u)
                } else {
                    Err("must be https:// (wrapped keys never travel in the clear)".into())
                }
            })
            .map_err(|e| {
                unreachable(
                    format!("master_key.endpoint {endpoint_text}: {e}"),
                    "give https://HOST[:PORT]",
                )
            })?;
        let tls = Arc::new(tls_config(settings.ca_file.as_deref())?);
        let credentials = CredentialChain::from_env(&settings.region, tls.clone(), env)?;
        let mut kek = AwsKmsKek {
            settings,
            endpoint,
            arn: String::new(),
            tls,
            credentials,
        };
        let probe = Secret::random(32);
        let (_, arn) = kek.encrypt(Purpose::KeyCheck, probe.expose_secret())?;
        kek.arn = arn;
        Ok(kek)
    }

    fn hint(&self) -> String {
        format!(
            "check that {} is reachable, that master_key.key_id {} exists in region {}, and \
             that the AWS credentials allow kms:Encrypt and kms:Decrypt on it",
            self.endpoint.origin(),
            self.settings.key_id,
            self.settings.region
        )
    }

    /// One signed KMS call; returns the JSON response or a mapped error.
    fn call(&self, action: &str, body: &serde_json::Value) -> Result<serde_json::Value, SealError> {
        let creds = self.credentials.get()?;
        let body = serde_json::to_vec(body).expect("JSON values serialise");
        let host = self.endpoint.host_header();
        let target = format!("TrentService.{action}");
        let headers = [
            ("host", host.as_str()),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", target.as_str()),
        ];
        let signed = sign(
            &creds,
            &self.settings.region,
            "kms",
            &self.endpoint,
            &headers,
            &body,
        )
        .map_err(|e| unreachable(format!("cannot sign the request: {e}"), self.hint()))?;
        let mut all: Vec<(&str, &str)> = headers[1..].to_vec();
        all.extend(signed.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let response = http(&self.tls, "POST", &self.endpoint, &all, &body)
            .map_err(|e| unreachable(e, self.hint()))?;
        let json: serde_json::Value = serde_json::from_slice(&response.body).map_err(|_| {
            // Signature and authentication failures may come as an XML `ErrorResponse`.
            let text = String::from_utf8_lossy(&response.body);
            let code = xml_text(&text, "Code")
                .map(|c| format!(" {c}"))
                .unwrap_or_default();
            unreachable(
                format!(
                    "{} answered {action} with HTTP {}{code}",
                    self.endpoint.origin(),
                    response.status
                ),
                self.hint(),
            )
        })?;
        if response.status == 200 {
            return Ok(json);
        }
        let kind = json
            .get("__type")
            .and_then(|t| t.as_str())
            .unwrap_or("unknown error");
        let kind = kind.rsplit('#').next().unwrap_or(kind).to_string();
        match kind.as_str() {
            "InvalidCiphertextException" | "IncorrectKeyException" => Err(SealError::Unauthentic),
            _ => {
                let message = json
                    .get("message")
                    .or_else(|| json.get("Message"))
                    .and_then(|m| m.as_str())
                    .unwrap_or("");
                Err(unreachable(
                    format!(
                        "{action} failed with {kind} (HTTP {}): {message}",
                        response.status
                    ),
                    self.hint(),
                ))
            }
        }
    }

    fn encrypt(
        &self,
        purpose: Purpose<'_>,
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, String), SealError> {
        let plaintext = Zeroizing::new(B64.encode(plaintext));
        let body = serde_json::json!({
            "KeyId": self.settings.key_id,
            "Plaintext": plaintext.as_str(),
            "EncryptionContext": context(purpose),
        });
        let json = self.call("Encrypt", &body)?;
        let blob = json
            .get("CiphertextBlob")
            .and_then(|b| b.as_str())
            .and_then(|b| B64.decode(b).ok())
            .ok_or_else(|| unreachable("Encrypt returned no CiphertextBlob".into(), self.hint()))?;
        let arn = json
            .get("KeyId")
            .and_then(|k| k.as_str())
            .unwrap_or(&self.settings.key_id)
            .to_string();
        Ok((blob, arn))
    }
}

fn is_denied(e: &SealError) -> bool {
    matches!(e, SealError::Unreachable { reason, .. } if reason.contains("AccessDeniedException"))
}

fn context(purpose: Purpose<'_>) -> serde_json::Value {
    serde_json::Value::Object(
        purpose
            .encryption_context()
            .into_iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
            .collect(),
    )
}

impl Kek for AwsKmsKek {
    fn provider(&self) -> &'static str {
        PROVIDER
    }

    fn identity(&self) -> String {
        self.arn.clone()
    }

    fn wrap(&self, purpose: Purpose<'_>, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        self.encrypt(purpose, plaintext).map(|(blob, _)| blob)
    }

    fn unwrap(&self, purpose: Purpose<'_>, wrapped: &[u8]) -> Result<Secret, SealError> {
        let mut body = serde_json::json!({
            "KeyId": self.arn,
            "CiphertextBlob": B64.encode(wrapped),
            "EncryptionContext": context(purpose),
        });
        // AWS KMS answers IncorrectKeyException for another key's ciphertext when KeyId is
        // given; KMS-compatible servers may answer AccessDeniedException instead. Asked again
        // without KeyId, the answer names the key that made the ciphertext, which must be ours.
        let json = match self.call("Decrypt", &body) {
            Err(denied @ SealError::Unreachable { .. }) if is_denied(&denied) => {
                body.as_object_mut().expect("an object").remove("KeyId");
                self.call("Decrypt", &body).map_err(|_| denied)?
            }
            other => other?,
        };
        if json.get("KeyId").and_then(|k| k.as_str()) != Some(self.arn.as_str()) {
            return Err(SealError::Unauthentic);
        }
        let text = json
            .get("Plaintext")
            .and_then(|p| p.as_str())
            .ok_or_else(|| unreachable("Decrypt returned no Plaintext".into(), self.hint()))?;
        let bytes = Zeroizing::new(B64.decode(text).map_err(|_| SealError::Malformed)?);
        Ok(Secret::from_slice(&bytes))
    }
}

/// Web PKI roots plus `ca_file`, rustls with the ring provider, TLS 1.3 and 1.2.
pub(crate) fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, SealError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let err = |reason: String| {
            unreachable(
                format!("master_key.ca_file {}: {reason}", path.display()),
                "give a PEM CA bundle",
            )
        };
        let pem = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(format!("not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(err("contains no `BEGIN CERTIFICATE` block".into()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| err(format!("a certificate cannot be a trust anchor: {e}")))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .expect("the ring provider supports TLS 1.2 and 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// SigV4 headers (`authorization`, `x-amz-date`, `x-amz-security-token`) for one request.
pub(crate) fn sign(
    creds: &Credentials,
    region: &str,
    service: &str,
    url: &Url,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Vec<(String, String)>, String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let secret = Zeroizing::new(
        String::from_utf8(creds.secret_access_key.expose_secret().to_vec())
            .map_err(|_| "the secret access key is not UTF-8".to_string())?,
    );
    let token = match &creds.session_token {
        Some(t) => Some(
            String::from_utf8(t.expose_secret().to_vec())
                .map_err(|_| "the session token is not UTF-8".to_string())?,
        ),
        None => None,
    };
    let identity = aws_credential_types::Credentials::new(
        creds.access_key_id.clone(),
        secret.as_str(),
        token,
        None,
        "keyward",
    )
    .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let uri = format!("{}{}", url.origin(), url.path);
    let request = SignableRequest::new(
        "POST",
        uri,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| e.to_string())?
        .into_parts();
    Ok(instructions
        .headers()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect())
}

/// An `http://` or `https://` URL: scheme, host, port, path and query.
#[derive(Debug, Clone)]
pub(crate) struct Url {
    pub(crate) tls: bool,
    host: String,
    port: u16,
    path: String,
}

impl Url {
    pub(crate) fn parse(text: &str) -> Result<Url, String> {
        let (tls, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("must start with https:// or http://".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let default = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed [ in the host")?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| "bad port")?,
                None => default,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| "bad port")?),
                None => (authority.to_string(), default),
            }
        };
        if host.is_empty() || authority.contains('@') {
            return Err("needs a host and no user name".into());
        }
        Ok(Url {
            tls,
            host,
            port,
            path: path.to_string(),
        })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    pub(crate) fn origin(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.host_header()
        )
    }
}

pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: Zeroizing<Vec<u8>>,
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// One HTTP/1.1 request on a new connection (`Connection: close`). Errors name the origin and
/// what failed, never a header value or body.
pub(crate) fn http(
    tls: &Arc<rustls::ClientConfig>,
    method: &str,
    url: &Url,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, String> {
    let origin = url.origin();
    let addrs: Vec<_> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {origin}: {e}"))?
        .collect();
    let mut last = format!("{origin} has no address");
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = format!("cannot connect to {origin}: {e}"),
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_read_timeout(Some(IO_TIMEOUT));
    let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
    let mut stream: Box<dyn Stream> = if url.tls {
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| format!("{origin}: not a valid TLS server name: {e}"))?;
        let conn = rustls::ClientConnection::new(tls.clone(), name)
            .map_err(|e| format!("{origin}: {e}"))?;
        Box::new(rustls::StreamOwned::new(conn, tcp))
    } else {
        Box::new(tcp)
    };
    let mut head = Zeroizing::new(format!(
        "{method} {} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\nconnection: close\r\n",
        url.path,
        url.host_header(),
        body.len()
    ));
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let io = |e: std::io::Error| format!("{origin}: {e}");
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    stream.flush().map_err(io)?;
    let mut raw = Zeroizing::new(Vec::new());
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_RESPONSE {
                    return Err(format!("{origin}: response larger than 1 MiB"));
                }
            }
            // Servers that close without TLS close_notify: the framing below decides.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(format!("{origin}: {e}")),
        }
    }
    buf.fill(0);
    parse_response(&raw).map_err(|e| format!("{origin}: {e}"))
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let start = match parsed.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the response ended early".into()),
        Err(e) => return Err(format!("not an HTTP response: {e}")),
    };
    let status = parsed.code.unwrap_or(0);
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let rest = &raw[start..];
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let line_end = rest[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("a chunk ended early")?;
            let size_text =
                std::str::from_utf8(&rest[at..at + line_end]).map_err(|_| "bad chunk")?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| "bad chunk size")?;
            at += line_end + 2;
            if size == 0 {
                break;
            }
            let chunk = rest.get(at..at + size).ok_or("a chunk ended early")?;
            out.extend_from_slice(chunk);
            at += size + 2;
        }
        out
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        rest.get(..len).ok_or("the body ended early")?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        body: Zeroizing::new(body),
    })
}

/// AWS credentials in locked memory.
pub(crate) struct Credentials {
    pub(crate) access_key_id: String,
    pub(crate) secret_access_key: Secret,
    pub(crate) session_token: Option<Secret>,
    /// When session credentials expire; `None` for long-term keys.
    pub(crate) expires: Option<SystemTime>,
}

/// Where the credentials come from (decided once at open, renewed from the same source).
enum Source {
    Environment,
    WebIdentity {
        token_file: PathBuf,
        role_arn: String,
        session_name: String,
        sts: Url,
    },
    Container {
        url: Url,
        token: Option<Secret>,
        token_file: Option<PathBuf>,
    },
    Imds,
}

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Source::Environment => "the environment (AWS_ACCESS_KEY_ID)",
            Source::WebIdentity { .. } => "web identity (AWS_WEB_IDENTITY_TOKEN_FILE)",
            Source::Container { .. } => "container credentials (AWS_CONTAINER_CREDENTIALS_*)",
            Source::Imds => "the EC2 instance metadata service (IMDSv2)",
        }
    }
}

pub(crate) struct CredentialChain {
    source: Source,
    tls: Arc<rustls::ClientConfig>,
    cached: Mutex<Option<Arc<Credentials>>>,
}

fn cred_error(source: &Source, reason: String) -> SealError {
    unreachable(
        format!("no AWS credentials from {}: {reason}", source.name()),
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_WEB_IDENTITY_TOKEN_FILE and \
         AWS_ROLE_ARN (EKS IRSA), or run where container credentials or IMDSv2 are served",
    )
}

impl CredentialChain {
    /// Picks the first source of the chain the environment configures, and fetches from it.
    pub(crate) fn from_env(
        region: &str,
        tls: Arc<rustls::ClientConfig>,
        lookup: EnvLookup<'_>,
    ) -> Result<CredentialChain, SealError> {
        let env = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let mut cached = None;
        let source = if let Some(id) = env("AWS_ACCESS_KEY_ID") {
            let fail = |reason: &str| cred_error(&Source::Environment, reason.into());
            let secret = Zeroizing::new(
                env("AWS_SECRET_ACCESS_KEY")
                    .ok_or_else(|| fail("AWS_SECRET_ACCESS_KEY is unset"))?,
            );
            let token = env("AWS_SESSION_TOKEN").map(Zeroizing::new);
            cached = Some(Arc::new(Credentials {
                access_key_id: id,
                secret_access_key: Secret::from_slice(secret.as_bytes()),
                session_token: token.map(|t| Secret::from_slice(t.as_bytes())),
                expires: None,
            }));
            Source::Environment
        } else if let (Some(token_file), Some(role_arn)) =
            (env("AWS_WEB_IDENTITY_TOKEN_FILE"), env("AWS_ROLE_ARN"))
        {
            let sts_text = env("AWS_ENDPOINT_URL_STS")
                .unwrap_or_else(|| format!("https://sts.{region}.amazonaws.com"));
            let sts = Url::parse(&sts_text).map_err(|e| {
                unreachable(
                    format!("AWS_ENDPOINT_URL_STS {sts_text}: {e}"),
                    "give https://HOST[:PORT]",
                )
            })?;
            Source::WebIdentity {
                token_file: PathBuf::from(token_file),
                role_arn,
                session_name: env("AWS_ROLE_SESSION_NAME").unwrap_or_else(|| "keyward".into()),
                sts,
            }
        } else if let Some(url) = env("AWS_CONTAINER_CREDENTIALS_FULL_URI").or_else(|| {
            env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                .map(|r| format!("http://169.254.170.2{r}"))
        }) {
            let url = Url::parse(&url).map_err(|e| {
                unreachable(
                    format!("AWS_CONTAINER_CREDENTIALS_FULL_URI: {e}"),
                    "give an http:// or https:// URL",
                )
            })?;
            Source::Container {
                url,
                token: env("AWS_CONTAINER_AUTHORIZATION_TOKEN")
                    .map(|t| Secret::from_slice(Zeroizing::new(t).as_bytes())),
                token_file: env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").map(PathBuf::from),
            }
        } else if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(cred_error(
                &Source::Imds,
                "none of the sources is configured and AWS_EC2_METADATA_DISABLED is set".into(),
            ));
        } else {
            Source::Imds
        };
        let chain = CredentialChain {
            source,
            tls,
            cached: Mutex::new(cached),
        };
        chain.get()?;
        Ok(chain)
    }

    /// Cached credentials, renewed when they expire within five minutes.
    pub(crate) fn get(&self) -> Result<Arc<Credentials>, SealError> {
        let mut cached = crate::lock(&self.cached);
        if let Some(c) = cached.as_ref() {
            let fresh = match c.expires {
                None => true,
                Some(at) => at
                    .duration_since(SystemTime::now())
                    .is_ok_and(|left| left > REFRESH_BEFORE),
            };
            if fresh {
                return Ok(c.clone());
            }
        }
        let fetched = Arc::new(self.fetch().map_err(|e| match e {
            e @ SealError::Unreachable { .. } => e,
            other => cred_error(&self.source, other.to_string()),
        })?);
        *cached = Some(fetched.clone());
        Ok(fetched)
    }

    fn fetch(&self) -> Result<Credentials, SealError> {
        let fail = |reason: String| cred_error(&self.source, reason);
        match &self.source {
            // Read once at open and never expiring: never renewed.
            Source::Environment => Err(fail("environment credentials are not renewed".into())),
            Source::WebIdentity {
                token_file,
                role_arn,
                session_name,
                sts,
            } => {
                let token = Zeroizing::new(
                    std::fs::read_to_string(token_file)
                        .map_err(|e| fail(format!("cannot read {}: {e}", token_file.display())))?,
                );
                let mut form = Zeroizing::new(String::new());
                form.push_str("Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=");
                form.push_str(&form_escape(role_arn));
                form.push_str("&RoleSessionName=");
                form.push_str(&form_escape(session_name));
                form.push_str("&WebIdentityToken=");
                form.push_str(&form_escape(token.trim()));
                let response = http(
                    &self.tls,
                    "POST",
                    sts,
                    &[("content-type", "application/x-www-form-urlencoded")],
                    form.as_bytes(),
                )
                .map_err(fail)?;
                let text = std::str::from_utf8(&response.body).unwrap_or("");
                if response.status != 200 {
                    let code = xml_text(text, "Code").unwrap_or("unknown error");
                    return Err(fail(format!(
                        "STS AssumeRoleWithWebIdentity for {role_arn} at {} failed with {code} \
                         (HTTP {})",
                        sts.origin(),
                        response.status
                    )));
                }
                let missing = |f: &str| fail(format!("the STS response has no {f}"));
                Ok(Credentials {
                    access_key_id: xml_text(text, "AccessKeyId")
                        .ok_or_else(|| missing("AccessKeyId"))?
                        .to_string(),
                    secret_access_key: Secret::from_slice(
                        xml_text(text, "SecretAccessKey")
                            .ok_or_else(|| missing("SecretAccessKey"))?
                            .as_bytes(),
                    ),
                    session_token: xml_text(text, "SessionToken")
                        .map(|t| Secret::from_slice(t.as_bytes())),
                    expires: xml_text(text, "Expiration").and_then(parse_time),
                })
            }
            Source::Container {
                url,
                token,
                token_file,
            } => {
                let file_token = match token_file {
                    Some(p) => {
                        Some(Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                            fail(format!("cannot read {}: {e}", p.display()))
                        })?))
                    }
                    None => None,
                };
                let auth = match (&file_token, token) {
                    (Some(t), _) => Some(t.trim().to_string()),
                    (None, Some(t)) => {
                        Some(String::from_utf8_lossy(t.expose_secret()).into_owned())
                    }
                    (None, None) => None,
                }
                .map(Zeroizing::new);
                let mut headers = vec![];
                if let Some(a) = &auth {
                    headers.push(("authorization", a.as_str()));
                }
                let response = http(&self.tls, "GET", url, &headers, b"").map_err(fail)?;
                json_credentials(&response, "Token").map_err(fail)
            }
            Source::Imds => {
                let base = "http://169.254.169.254";
                let url = |p: &str| Url::parse(&format!("{base}{p}")).expect("a fixed URL");
                let token = http(
                    &self.tls,
                    "PUT",
                    &url("/latest/api/token"),
                    &[("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
                    b"",
                )
                .map_err(fail)?;
                if token.status != 200 {
                    return Err(fail(format!("IMDSv2 token: HTTP {}", token.status)));
                }
                let token = Zeroizing::new(String::from_utf8_lossy(&token.body).into_owned());
                let h = [("x-aws-ec2-metadata-token", token.as_str())];
                let path = "/latest/meta-data/iam/security-credentials/";
                let role = http(&self.tls, "GET", &url(path), &h, b"").map_err(fail)?;
                let role = String::from_utf8_lossy(&role.body).trim().to_string();
                if role.is_empty() || role.contains(['/', '?', '#', ' ']) {
                    return Err(fail("the instance has no IAM role".into()));
                }
                let response = http(&self.tls, "GET", &url(&format!("{path}{role}")), &h, b"")
                    .map_err(fail)?;
                json_credentials(&response, "Token").map_err(fail)
            }
        }
    }
}

/// `{AccessKeyId, SecretAccessKey, Token, Expiration}` of container credentials and IMDS.
fn json_credentials(response: &Response, token_field: &str) -> Result<Credentials, String> {
    if response.status != 200 {
        return Err(format!("HTTP {}", response.status));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&response.body).map_err(|_| "the answer is not JSON".to_string())?;
    let field = |f: &str| json.get(f).and_then(|v| v.as_str());
    let id = field("AccessKeyId").ok_or("no AccessKeyId")?;
    let secret = field("SecretAccessKey").ok_or("no SecretAccessKey")?;
    Ok(Credentials {
        access_key_id: id.to_string(),
        secret_access_key: Secret::from_slice(secret.as_bytes()),
        session_token: field(token_field).map(|t| Secret::from_slice(t.as_bytes())),
        expires: field("Expiration").and_then(parse_time),
    })
}

pub(crate) fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text.trim().trim_end_matches('Z')).ok()
}

/// The text of the first `<tag>…</tag>` (STS answers are small, flat XML).
pub(crate) fn xml_text<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].trim())
}

/// `application/x-www-form-urlencoded` escaping.
pub(crate) fn form_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_ports_paths_and_ipv6() {
        let u = Url::parse("https://127.0.0.1:4566").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (true, "127.0.0.1", 4566, "/")
        );
        assert_eq!(u.origin(), "https://127.0.0.1:4566");
        let u = Url::parse("http://[fd00:ec2::23]/v1/credentials").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("fd00:ec2::23", 80, "/v1/credentials")
        );
        assert_eq!(u.host_header(), "[fd00:ec2::23]");
        assert!(Url::parse("ftp://x").is_err());
        assert!(Url::parse("https://u@x").is_err());
    }

    #[test]
    fn responses_parse_with_length_or_chunks() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhiXX").unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"hi"[..]));
        let r = parse_response(
            b"HTTP/1.1 400 Bad\r\ntransfer-encoding: chunked\r\n\r\n\
              3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, &r.body[..]), (400, &b"abcde"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhi").is_err());
    }

    #[test]
    fn sts_answers_and_forms() {
        let xml = "<R><Credentials><AccessKeyId>AKIA1</AccessKeyId>\
                   <Expiration>2030-01-02T03:04:05Z</Expiration></Credentials></R>";
        assert_eq!(xml_text(xml, "AccessKeyId"), Some("AKIA1"));
        assert!(parse_time(xml_text(xml, "Expiration").unwrap()).is_some());
        assert_eq!(
            form_escape("arn:aws:iam::1:role/r x"),
            "arn%3Aaws%3Aiam%3A%3A1%3Arole%2Fr%20x"
        );
    }
}
