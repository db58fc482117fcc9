"""A Bedrock Runtime stand-in for keyward's tests that does not trust keyward's signing.

Every request's SigV4 signature is recomputed with botocore (``botocore.auth.SigV4Auth``) over
the request as received, with the secret the test generated (or, for assumed roles, the one
moto's STS issued, read from moto's backend in this same process); a bad or stale signature,
an unknown access key id, a wrong region or service gets 403 like the real service. Answers
Converse and InvokeModel with JSON, ConverseStream and InvokeModelWithResponseStream with
``application/vnd.amazon.eventstream`` frames (prelude, headers, payload and CRC32s built here
with zlib; InvokeModel chunks carry the model's JSON base64-encoded in ``bytes``). A streamed
request whose body holds ``"hold": true`` gets its first frame, then nothing until the file
``release`` appears in ``out`` (or 20 s pass); ``holds.jsonl`` says which happened.

Also serves moto's STS (the real moto server application) over TLS on a second port.

Usage: python bedrock_mock.py CONFIG.json, where CONFIG names cert, key, region, the static
credentials ``[{"akid", "secret", "token"?}]``, the expected external id, and ``out`` (a
directory that receives ``ports.json`` and ``requests.jsonl``).
"""

import base64
import datetime
import os
import time
import json
import re
import struct
import sys
import threading
import zlib
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

CONFIG = json.load(open(sys.argv[1]))
LOG_LOCK = threading.Lock()
AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$"
)


def log(entry):
    with LOG_LOCK:
        with open(CONFIG["out"] + "/requests.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def assumed(akid):
    """The secret, token and external id moto's STS issued for `akid`, if it did."""
    from moto.sts.models import sts_backends

    for account in list(sts_backends.keys()):
        for partition in list(sts_backends[account].keys()):
            for role in sts_backends[account][partition].assumed_roles:
                if role.access_key_id == akid:
                    return role.secret_access_key, role.session_token, role.external_id
    return None


def frame(event_type, payload):
    headers = b""
    for name, value in (
        (":event-type", event_type),
        (":content-type", "application/json"),
        (":message-type", "event"),
    ):
        headers += bytes([len(name)]) + name.encode() + b"\x07"
        headers += struct.pack(">H", len(value)) + value.encode()
    body = json.dumps(payload).encode()
    total = 12 + len(headers) + len(body) + 4
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + headers + body
    return message + struct.pack(">I", zlib.crc32(message))


class Bedrock(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def refuse(self, status, kind, message):
        body = json.dumps({"message": message}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("x-amzn-errortype", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def verify(self, body):
        """(access key id, secret, token) of a valid signature, or (None, reason)."""
        m = AUTH_RE.match(self.headers.get("authorization", ""))
        if not m:
            return None, "no SigV4 Authorization header"
        akid, date, region, service, signed, signature = m.groups()
        if region != CONFIG["region"] or service != "bedrock":
            return None, f"credential scope {region}/{service} is wrong"
        static = {c["akid"]: c for c in CONFIG["static"]}
        if akid in static:
            secret, token = static[akid]["secret"], static[akid].get("token")
            external = None
        else:
            found = assumed(akid)
            if found is None:
                return None, "UnrecognizedClientException: unknown access key id"
            secret, token, external = found
            if external != CONFIG["external_id"]:
                return None, "the role was assumed without the expected external id"
        if token is not None and self.headers.get("x-amz-security-token") != token:
            return None, "ExpiredTokenException: the security token included in the request is expired"
        amz_date = self.headers.get("x-amz-date", "")
        when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")
        if abs((datetime.datetime.utcnow() - when).total_seconds()) > 300:
            return None, "Signature expired (clock skew)"
        names = signed.split(";")
        if "host" not in names or "x-amz-date" not in names:
            return None, "host and x-amz-date must be signed"
        headers = {n: self.headers.get(n) for n in names}
        request = AWSRequest(
            method=self.command,
            url="https://" + self.headers["host"] + self.path,
            data=body,
            headers=headers,
        )
        request.context["timestamp"] = amz_date
        auth = SigV4Auth(Credentials(akid, secret, token), "bedrock", region)
        canonical = auth.canonical_request(request)
        expected = auth.signature(auth.string_to_sign(request, canonical), request)
        if expected != signature:
            return None, "InvalidSignatureException: the signature does not match"
        return (akid, secret, token), None

    def do_GET(self):
        """ListAsyncInvokes (``GET /async-invoke``), the read-only call of ``keyward cred test``;
        signed over an empty body, like every GET."""
        who, why = self.verify(b"")
        log(
            {
                "method": "GET",
                "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
                "body": "",
                "verified": who is not None,
                "why": why,
                "akid": who[0] if who else None,
            }
        )
        if who is None:
            self.refuse(403, "InvalidSignatureException", why)
            return
        if not re.match(r"^/async-invoke(\?|$)", self.path):
            self.refuse(404, "UnknownOperationException", "unknown path " + self.path)
            return
        out = json.dumps({"asyncInvokeSummaries": []}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        who, why = self.verify(body)
        log(
            {
                "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
                "body": body.decode("utf-8", "replace"),
                "verified": who is not None,
                "why": why,
                "akid": who[0] if who else None,
                "derived_secret": who[1] if who and who[0] not in
                [c["akid"] for c in CONFIG["static"]] else None,
                "derived_token": who[2] if who and who[0] not in
                [c["akid"] for c in CONFIG["static"]] else None,
            }
        )
        if who is None:
            kind = why.split(":")[0] if why.split(":")[0].endswith("Exception") else None
            self.refuse(403, kind or "InvalidSignatureException", why)
            return
        m = re.match(
            r"^/model/([^/]+)/(converse|converse-stream|invoke|invoke-with-response-stream)$",
            self.path,
        )
        if not m:
            self.refuse(404, "UnknownOperationException", "unknown path " + self.path)
            return
        text = "hello from bedrock"
        if b"ECHO" in body:
            text += " " + who[1] + " " + (who[2] or "")
        usage = {
            "inputTokens": 12,
            "outputTokens": 5,
            "totalTokens": 22,
            "cacheReadInputTokens": 3,
            "cacheWriteInputTokens": 2,
        }
        method = m.group(2)
        if method in ("converse", "invoke"):
            if method == "converse":
                doc = {
                    "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                    "stopReason": "end_turn",
                    "usage": usage,
                    "metrics": {"latencyMs": 7},
                }
            else:
                doc = {
                    "type": "message",
                    "content": [{"type": "text", "text": text}],
                    "usage": {"input_tokens": 21, "output_tokens": 7},
                }
            out = json.dumps(doc).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        self.send_response(200)
        self.send_header("content-type", "application/vnd.amazon.eventstream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        if method == "converse-stream":
            frames = [frame("messageStart", {"role": "assistant"})]
            for piece in text.split(" "):
                frames.append(
                    frame(
                        "contentBlockDelta",
                        {"contentBlockIndex": 0, "delta": {"text": piece + " "}},
                    )
                )
            frames += [
                frame("contentBlockStop", {"contentBlockIndex": 0}),
                frame("messageStop", {"stopReason": "end_turn"}),
                frame("metadata", {"usage": usage, "metrics": {"latencyMs": 9}}),
            ]
        else:
            # The model's own stream (Anthropic messages here), one chunk per event; usage only
            # in the last chunk's invocation metrics, as Bedrock adds them.
            events = [{"type": "message_start", "message": {"role": "assistant"}}]
            for piece in text.split(" "):
                events.append(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": piece + " "},
                    }
                )
            events.append(
                {
                    "type": "message_stop",
                    "amazon-bedrock-invocationMetrics": {
                        "inputTokenCount": 21,
                        "outputTokenCount": 7,
                        "invocationLatency": 40,
                        "firstByteLatency": 10,
                    },
                }
            )
            frames = [
                frame(
                    "chunk",
                    {"bytes": base64.b64encode(json.dumps(e).encode()).decode(), "p": "abcdefgh"},
                )
                for e in events
            ]
        hold = b'"hold": true' in body or b'"hold":true' in body
        for i, f in enumerate(frames):
            self.wfile.write(b"%x\r\n" % len(f) + f + b"\r\n")
            self.wfile.flush()
            if hold and i == 0:
                release = CONFIG["out"] + "/release"
                deadline = time.time() + 20
                while not os.path.exists(release) and time.time() < deadline:
                    time.sleep(0.02)
                with LOG_LOCK:
                    with open(CONFIG["out"] + "/holds.jsonl", "a") as h:
                        h.write(json.dumps({"released": os.path.exists(release)}) + "\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def tls(server):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(CONFIG["cert"], CONFIG["key"])
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return server


def main():
    from moto.moto_server.threaded_moto_server import MotoRequestHandler
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    sts = make_server(
        "127.0.0.1",
        0,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        request_handler=MotoRequestHandler,
        ssl_context=(CONFIG["cert"], CONFIG["key"]),
    )
    threading.Thread(target=sts.serve_forever, daemon=True).start()
    bedrock = tls(ThreadingHTTPServer(("127.0.0.1", 0), Bedrock))
    with open(CONFIG["out"] + "/ports.json.tmp", "w") as f:
        json.dump({"bedrock": bedrock.server_address[1], "sts": sts.server_address[1]}, f)
    os.rename(CONFIG["out"] + "/ports.json.tmp", CONFIG["out"] + "/ports.json")
    bedrock.serve_forever()


if __name__ == "__main__":
    main()
