"""An OTLP/HTTP trace receiver for tests: decodes each POST /v1/traces body as an
ExportTraceServiceRequest with the official opentelemetry-proto package, appends the spans as
JSON lines to OUT_DIR/spans.jsonl and the raw bodies to OUT_DIR/raw.bin, and answers with an
empty ExportTraceServiceResponse, as a collector does.

Usage: python otlp_receiver.py OUT_DIR   (prints the port it listens on, then serves)
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OUT = sys.argv[1]


def any_value(v):
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "double_value":
        return v.double_value
    return {"unsupported": kind}


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        if self.path != "/v1/traces":
            self.send_error(404, "only /v1/traces")
            return
        if self.headers.get("content-type") != "application/x-protobuf":
            self.send_error(415, "expected application/x-protobuf")
            return
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(body)
        except Exception as e:  # a collector answers 400 to a body it cannot decode
            self.send_error(400, "not an ExportTraceServiceRequest: %s" % e)
            return
        lines = []
        for rs in request.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    lines.append(
                        json.dumps(
                            {
                                "resource": resource,
                                "scope": ss.scope.name,
                                "scope_version": ss.scope.version,
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "start_unix_nano": span.start_time_unix_nano,
                                "end_unix_nano": span.end_time_unix_nano,
                                "status_code": span.status.code,
                                "status_message": span.status.message,
                                "attributes": attributes(span.attributes),
                            }
                        )
                    )
        with open(os.path.join(OUT, "raw.bin"), "ab") as f:
            f.write(body)
        with open(os.path.join(OUT, "spans.jsonl"), "a") as f:
            for line in lines:
                f.write(line + "\n")
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
