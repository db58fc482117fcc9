"""A stand-in for Google's OAuth2 token endpoint and Microsoft Entra ID's, over real TLS, for
tests/cloud_identity.rs. It checks what the real services check, with an implementation
independent of keyward's (pyca/cryptography, not ring):

- POST /token (Google, JWT bearer grant, RFC 7523): grant_type, an RS256 JWT whose signature
  verifies against the service account's PUBLIC key, iss = the account's email, scope =
  cloud-platform, aud = this token URL, iat not in the future, exp after now and at most an hour
  after iat. Anything else: 400 {"error": "invalid_grant"}.
- POST /private/oauth2/token: the same grant as a private or VPC endpoint a target's
  `token_url` names, for the key in sa_private.json, whose own token_uri (the JWT's aud) is a
  host that does not resolve: it only works when keyward goes where the target says.
- POST /{tenant}/oauth2/v2.0/token (Entra ID, client credentials): grant_type, the tenant,
  client_id, client_secret and scope https://cognitiveservices.azure.com/.default. A wrong
  secret: 401 {"error": "invalid_client", "error_description": "AADSTS7000215: ..."}. Also
  under /sovereign/..., as a sovereign cloud's authority with a path.

Every path asked for is listed in stats.json's "paths".

Usage: token_endpoint.py DIR. It writes into DIR: ca.pem (its own test CA), sa.json (a fresh
service account key whose token_uri is this server), sa_other.json (a key the server does not
know), entra.json (client credentials it accepts), then port (last, when it is listening).
Each answer re-reads DIR/control.json ({"expires_in": s, "delay_ms": ms, "tokens": [..]}:
tokens to issue first, in order) and rewrites DIR/stats.json atomically.
"""

import base64
import datetime
import json
import os
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

GOOGLE_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
AZURE_SCOPE = "https://cognitiveservices.azure.com/.default"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"

DIR = sys.argv[1]
LOCK = threading.Lock()
STATS = {"google": 0, "google_refused": 0, "entra": 0, "entra_refused": 0, "issued": [],
         "reasons": [], "paths": []}
# The token URI of sa_private.json: Google's, on a name that never resolves.
PRIVATE_AUD = "https://oauth2.googleapis.invalid/token"


def write_atomic(name, data):
    tmp = os.path.join(DIR, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, os.path.join(DIR, name))


def tls_files():
    """A CA and a leaf for 127.0.0.1 and localhost, EC P-256."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token endpoint test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token endpoint")]))
            .issuer_name(ca_name).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    leaf_path = os.path.join(DIR, ".leaf.pem")
    with open(leaf_path, "wb") as f:
        f.write(pem(leaf) + pem(ca))
        f.write(leaf_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    write_atomic("ca.pem", pem(ca).decode())
    return leaf_path


def service_account(token_uri, email):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    doc = {
        "type": "service_account",
        "project_id": "kw-test",
        "private_key_id": secrets.token_hex(20),
        "private_key": key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode(),
        "client_email": email,
        "client_id": str(secrets.randbelow(10**20)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    return key.public_key(), doc


def b64d(part):
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode(), strict_parsing=False)
        field = lambda k: (form.get(k) or [None])[0]
        try:
            with open(os.path.join(DIR, "control.json")) as f:
                control = json.load(f)
        except FileNotFoundError:
            control = {}
        time.sleep(control.get("delay_ms", 0) / 1000)
        if self.headers.get("content-type") != "application/x-www-form-urlencoded":
            return self.refuse("google", 400, "invalid_request", "content-type is not a form")
        with LOCK:
            STATS["paths"].append(self.path)
        if self.path == "/token":
            reason = self.check_google(field, SA["token_uri"])
            kind = "google"
        elif self.path == "/private/oauth2/token":
            reason = self.check_google(field, PRIVATE_AUD)
            kind = "google"
        elif self.path in (f"/{ENTRA['tenant_id']}/oauth2/v2.0/token",
                           f"/sovereign/{ENTRA['tenant_id']}/oauth2/v2.0/token"):
            reason = self.check_entra(field)
            kind = "entra"
        else:
            return self.refuse("google", 404, "not_found", f"no endpoint {self.path}")
        if reason:
            code = "invalid_client" if kind == "entra" else "invalid_grant"
            status = 401 if kind == "entra" else 400
            return self.refuse(kind, status, code, reason)
        with LOCK:
            STATS[kind] += 1
            queued = control.get("tokens", [])
            used = len(STATS["issued"])
            token = queued[used] if used < len(queued) else "ya29." + secrets.token_urlsafe(48)
            STATS["issued"].append(token)
            write_atomic("stats.json", json.dumps(STATS))
        self.answer(200, {"access_token": token, "token_type": "Bearer",
                          "expires_in": control.get("expires_in", 3599)})

    def refuse(self, kind, status, code, reason):
        with LOCK:
            STATS[f"{kind}_refused"] += 1
            STATS["reasons"].append(reason)
            write_atomic("stats.json", json.dumps(STATS))
        description = reason
        if code == "invalid_client":
            description = ("AADSTS7000215: Invalid client secret provided. Ensure the secret being "
                           "sent in the request is the client secret value, not the client "
                           "secret ID. " + reason)
        self.answer(status, {"error": code, "error_description": description})

    def check_google(self, field, audience):
        if field("grant_type") != JWT_BEARER:
            return "grant_type is not jwt-bearer"
        assertion = field("assertion") or ""
        parts = assertion.split(".")
        if len(parts) != 3:
            return "the assertion is not a JWT"
        header, claims = json.loads(b64d(parts[0])), json.loads(b64d(parts[1]))
        if header.get("alg") != "RS256":
            return "alg is not RS256"
        if header.get("kid") != SA["private_key_id"]:
            return "kid is not the key's id"
        try:
            SA_PUBLIC.verify(b64d(parts[2]), f"{parts[0]}.{parts[1]}".encode(),
                             padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return "Invalid JWT Signature."
        now = time.time()
        if claims.get("iss") != SA["client_email"]:
            return "iss is not the service account"
        if claims.get("scope") != GOOGLE_SCOPE:
            return "scope is not cloud-platform"
        if claims.get("aud") != audience:
            return "aud is not the token URI"
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            return "iat/exp missing"
        if iat > now + 60 or exp <= now or exp - iat > 3600:
            return "Invalid JWT: Token must be a short-lived token (60 minutes)"
        return None

    def check_entra(self, field):
        if field("grant_type") != "client_credentials":
            return "grant_type is not client_credentials"
        if field("client_id") != ENTRA["client_id"]:
            return "AADSTS700016: Application not found in the directory"
        if field("scope") != AZURE_SCOPE:
            return "AADSTS70011: The provided value for scope is not valid"
        if not secrets.compare_digest(field("client_secret") or "", ENTRA["client_secret"]):
            return f"Trace ID: {secrets.token_hex(8)}"
        return None


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
port = server.server_address[1]
base = f"https://127.0.0.1:{port}"
SA_PUBLIC, SA = service_account(f"{base}/token", "kw-test@kw-test.iam.gserviceaccount.com")
_, SA_OTHER = service_account(f"{base}/token", SA["client_email"])
SA_OTHER["private_key_id"] = SA["private_key_id"]
ENTRA = {"tenant_id": "contoso.onmicrosoft.com",
         "client_id": "0b8f4c2e-" + secrets.token_hex(2) + "-4a1b-9c3d-" + secrets.token_hex(6),
         "client_secret": "Q~" + secrets.token_urlsafe(30)}
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(tls_files())
server.socket = context.wrap_socket(server.socket, server_side=True)
write_atomic("sa.json", json.dumps(SA, indent=2))
write_atomic("sa_other.json", json.dumps(SA_OTHER, indent=2))
write_atomic("sa_private.json", json.dumps(dict(SA, token_uri=PRIVATE_AUD), indent=2))
write_atomic("entra.json", json.dumps(ENTRA))
write_atomic("stats.json", json.dumps(STATS))
write_atomic("port", str(port))
server.serve_forever()
