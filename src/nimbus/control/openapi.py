"""The control API's OpenAPI 3 document, served at ``GET /v1/openapi.json``.

Written by hand beside :mod:`nimbus.control.api` (which checks every
parameter against the same caps, imported from here), so the document and
the checks cannot drift apart on the numbers.
"""

from __future__ import annotations

from typing import Any

from nimbus.store.queue import STATUSES

NAME_PATTERN = r"[A-Za-z0-9_.-]{1,128}"
MAX_LIMIT = 10_000
MAX_TAIL = 100_000
MAX_ID_CHARS = 128
MAX_KEY_CHARS = 256
MAX_SUBJECT_CHARS = 1024
MAX_ATTRIBUTES = 50
MAX_REDRIVE_IDS = 1_000
MAX_INVOKE_BYTES = 6 * 1024 * 1024

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": schema or {}}}}


_NDJSON = {"application/x-ndjson": {"schema": {"type": "string"}}}
_NAME = {"name": "name", "in": "path", "required": True,
         "description": "a function name (or, for publish, a queue or topic name)",
         "schema": {"type": "string", "pattern": f"^{NAME_PATTERN}$"}}
_ALIAS = {"name": "alias", "in": "path", "required": True,
          "description": "an alias name: lower-case letters, digits and '-', from a letter",
          "schema": {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,62}$"}}
_LIMIT = {"name": "limit", "in": "query", "required": False,
          "description": "most records to return, newest first",
          "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50}}
_IDEMPOTENCY = {"name": "idempotency-key", "in": "header", "required": False,
                "description": "a repeat with the same key within 24 h returns the first "
                               "id and does not run again",
                "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS}}
_COMMON_ERRORS = {"400": _error("a parameter or the body is not valid; the message names it"),
                  "401": _error("missing or wrong bearer token")}


def _op(summary: str, op_id: str, responses: dict[str, Any],
        parameters: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
        public: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "operationId": op_id,
                          "parameters": parameters or []}
    if body is not None:
        op["requestBody"] = body
    if public:
        op["security"] = []
        op["responses"] = responses
    else:
        op["responses"] = {**responses, **_COMMON_ERRORS}
    return op


def document(*, max_bundle_bytes: int) -> dict[str, Any]:
    record = {"type": "object", "description": "an async invocation record",
              "properties": {"id": {"type": "string"}, "function": {"type": "string"},
                             "status": {"type": "string", "enum": list(STATUSES)}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "nimbus control API", "version": "1",
                 "description": "Deploy, invoke, inspect and operate a running nimbus. "
                                "Every call but /v1/health and /v1/openapi.json needs "
                                "`Authorization: Bearer <token>` (the `token` file in the "
                                "state folder). Errors are "
                                "`{\"errorType\", \"errorMessage\"}`."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {
                "type": "object", "required": ["errorType", "errorMessage"],
                "properties": {"errorType": {"type": "string"},
                               "errorMessage": {"type": "string"}}}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/health": {"get": _op(
                "liveness", "health", {"200": _json("nimbus is up")}, public=True)},
            "/v1/openapi.json": {"get": _op(
                "this document", "openapi", {"200": _json("the OpenAPI 3 document")},
                public=True)},
            "/v1/deploy": {"post": _op(
                "deploy (or redeploy) an app bundle", "deploy",
                {"200": {"description": "progress lines, then one result or error line",
                         "content": _NDJSON},
                 "413": _error(f"the bundle is over {max_bundle_bytes} bytes")},
                [{"name": "name", "in": "query", "required": False,
                  "description": "the app's name when its manifest has none",
                  "schema": {"type": "string", "maxLength": 256}},
                 {"name": "regions", "in": "query", "required": False,
                  "description": "the app's routing as JSON ({names, policy, weights}), "
                                 "replacing its manifest's regions:",
                  "schema": {"type": "string", "maxLength": 4096}},
                 {"name": "strategy", "in": "query", "required": False,
                  "description": "how changed functions reach traffic: canary:10%:5m, "
                                 "linear:20%:1m or all-at-once (overrides the manifest's "
                                 "rollout: block)",
                  "schema": {"type": "string", "maxLength": 256}},
                 {"name": "rollback_on", "in": "query", "required": False,
                  "description": "the rollback rule, e.g. 'error_rate > 2% or p99 > 2x "
                                 "baseline'",
                  "schema": {"type": "string", "maxLength": 1024}},
                 {"name": "min_requests", "in": "query", "required": False,
                  "description": "requests the new version must answer before a step passes",
                  "schema": {"type": "integer", "minimum": 1, "maximum": 1_000_000}},
                 {"name": "parameters", "in": "query", "required": False,
                  "description": "a SAM template's parameter overrides as a JSON object of "
                                 "strings ({\"Stage\": \"prod\"})",
                  "schema": {"type": "string", "maxLength": 4096}}],
                {"required": True,
                 "description": "the app folder as a zip file (what nimbus deploy sends)",
                 "content": {"application/octet-stream": {"schema": {
                     "type": "string", "format": "binary"}}}})},
            "/v1/apps": {"get": _op(
                "deployed apps: digest, version, routing (regions) and routes", "apps",
                {"200": _json("the apps", {"type": "array", "items": {"type": "object"}})})},
            "/v1/functions": {"get": _op(
                "deployed functions, versions and routes", "functions",
                {"200": _json("the functions", {"type": "array", "items": {"type": "object"}})})},
            "/v1/functions/{name}/invoke": {"post": _op(
                "invoke a function once (or queue it)", "invoke",
                {"200": _json("the result: {requestId, version, result}"),
                 "202": _json("queued: {invocationId, function, duplicate}"),
                 "204": {"description": "DryRun: the call would be accepted"},
                 "404": _error("no such function, or no such version or alias"),
                 "413": _error(f"the payload is over {MAX_INVOKE_BYTES} bytes"),
                 "429": _error("the function is at its concurrency cap")},
                [_NAME,
                 {"name": "async", "in": "query", "required": False,
                  "description": "queue the invocation (as X-Nimbus-Invocation-Type: Event)",
                  "schema": {"type": "string", "enum": ["true", "false", "1", "0"]}},
                 {"name": "qualifier", "in": "query", "required": False,
                  "description": "a version number or alias name (default: live)",
                  "schema": {"type": "string", "maxLength": 64}},
                 {"name": "x-nimbus-invocation-type", "in": "header", "required": False,
                  "schema": {"type": "string",
                             "enum": ["RequestResponse", "Event", "DryRun"]}},
                 _IDEMPOTENCY],
                {"required": False, "description": "the event (JSON; none means {})",
                 "content": {"application/json": {"schema": {}}}})},
            "/v1/functions/{name}/logs": {"get": _op(
                "a function's log lines", "logs",
                {"200": {"description": "one JSON record per line (chunked); with "
                                        "Accept: text/event-stream, Server-Sent Events: "
                                        "one `log` event per record, its data the record",
                         "content": {**_NDJSON, "text/event-stream": {
                             "schema": {"type": "string"}}}},
                 "404": _error("no such function: not deployed and no logs kept")},
                [_NAME,
                 {"name": "request_id", "in": "query", "required": False,
                  "description": "only this invocation's lines",
                  "schema": {"type": "string", "maxLength": MAX_ID_CHARS}},
                 {"name": "tail", "in": "query", "required": False,
                  "description": "only the last N lines",
                  "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TAIL}},
                 {"name": "follow", "in": "query", "required": False,
                  "description": "keep the response open and send new lines as they come",
                  "schema": {"type": "string", "enum": ["true", "false", "1", "0"]}},
                 {"name": "since", "in": "query", "required": False,
                  "description": "only lines since then: a span back from now (90s, 10m, "
                                 "2h, 1d) or an ISO 8601 time (UTC without an offset)",
                  "schema": {"type": "string", "maxLength": 64}},
                 {"name": "level", "in": "query", "required": False,
                  "description": "only lines of this level or above; lines without a "
                                 "level (print) count as INFO",
                  "schema": {"type": "string",
                             "enum": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]}}])},
            "/v1/status": {"get": _op(
                "pools, instances, zygotes, memory, connections", "status",
                {"200": _json("the status", {"type": "object"})})},
            "/v1/functions/{name}/invocations": {"get": _op(
                "a function's async invocations, newest first", "invocations",
                {"200": _json("the records", {"type": "array", "items": record})},
                [_NAME, _LIMIT,
                 {"name": "status", "in": "query", "required": False,
                  "schema": {"type": "string", "enum": list(STATUSES)}}])},
            "/v1/invocations/{id}": {"get": _op(
                "one async invocation record", "invocation",
                {"200": _json("the record", record), "404": _error("no such invocation")},
                [{"name": "id", "in": "path", "required": True,
                  "schema": {"type": "string", "minLength": 1,
                             "maxLength": MAX_ID_CHARS}}])},
            "/v1/traces/{id}": {"get": _op(
                "the spans of one request's trace (attribute nimbus.request_id)", "traces",
                {"200": _json("{request_id, spans: [{trace_id, span_id, parent_id, name, "
                              "kind, start_ns, end_ns, attributes, status}]}"),
                 "404": _error("no spans of that request")},
                [{"name": "id", "in": "path", "required": True,
                  "schema": {"type": "string", "minLength": 1,
                             "maxLength": MAX_ID_CHARS}}])},
            "/v1/functions/{name}/dlq": {"get": _op(
                "a function's dead letters", "dlq",
                {"200": _json("the records", {"type": "array", "items": record})},
                [_NAME, _LIMIT])},
            "/v1/functions/{name}/dlq/redrive": {"post": _op(
                "queue dead letters again with fresh tries", "redrive",
                {"200": _json("how many moved", {
                    "type": "object", "properties": {"redriven": {"type": "integer"}}}),
                 "404": _error("none of the ids is a dead letter of the function")},
                [_NAME],
                {"required": False,
                 "description": "none: every dead letter; or only these ids",
                 "content": {"application/json": {"schema": {
                     "type": "object", "required": ["ids"], "additionalProperties": False,
                     "properties": {"ids": {
                         "type": "array", "maxItems": MAX_REDRIVE_IDS,
                         "items": {"type": "string", "minLength": 1,
                                   "maxLength": MAX_ID_CHARS}}}}}}})},
            "/v1/functions/{name}/rollout": {"get": _op(
                "the function's latest rollout: steps, shares, decisions and their figures",
                "rolloutStatus",
                {"200": _json("the rollout", {"type": "object"}),
                 "404": _error("the function has had no rollout")},
                [_NAME])},
            "/v1/functions/{name}/rollback": {"post": _op(
                "end a running rollout on the old version, or move live to a version",
                "rollback",
                {"200": _json("what serves now: {function, live, from, to, cold_start, "
                              "message}"),
                 "404": _error("no such function or version"),
                 "409": _error("the rollout kept changing")},
                [_NAME],
                {"required": False,
                 "description": "none: the old version (or the one before the stable one)",
                 "content": {"application/json": {"schema": {
                     "type": "object", "additionalProperties": False,
                     "properties": {"to": {"type": "integer", "minimum": 1}}}}}})},
            "/v1/functions/{name}/versions": {"get": _op(
                "a function's versions, newest first, with each one's share per alias",
                "versions",
                {"200": _json("{function, app, versions: [{version, digest, config_hash, "
                              "created, handler, memory_mb, timeout_s, stable, shares}]}"),
                 "404": _error("no such function")},
                [_NAME])},
            "/v1/functions/{name}/aliases": {"get": _op(
                "a function's aliases and their weights", "aliases",
                {"200": _json("{function, app, stable, aliases: {ALIAS: {VERSION: WEIGHT}}, "
                              "routes}"),
                 "404": _error("no such function")},
                [_NAME])},
            "/v1/functions/{name}/aliases/{alias}": {
                "put": _op(
                    "point an alias at a version, or split it by weight", "set_alias",
                    {"200": _json("the function's aliases after the change"),
                     "404": _error("no such function, or a version that does not exist "
                                   "(the message names those that do)"),
                     "409": _error("live is being moved by a running rollout")},
                    [_NAME, _ALIAS],
                    {"required": True,
                     "description": "weights (whole percents) per version, summing to 100",
                     "content": {"application/json": {"schema": {
                         "type": "object", "required": ["weights"],
                         "additionalProperties": False,
                         "properties": {"weights": {
                             "type": "object", "minProperties": 1, "maxProperties": 10,
                             "additionalProperties": {"type": "integer", "minimum": 0,
                                                      "maximum": 100}}}}}}}),
                "delete": _op(
                    "remove an alias (not live, nor one a route serves)", "remove_alias",
                    {"200": _json("the function's aliases after the change"),
                     "404": _error("no such function or alias")},
                    [_NAME, _ALIAS])},
            "/v1/publish/{name}": {"post": _op(
                "a message to a queue or topic", "publish",
                {"202": _json("accepted: {messageId, kind, deliveries}"),
                 "404": _error("no such queue or topic"),
                 "413": _error(f"the message is over {MAX_INVOKE_BYTES} bytes")},
                [_NAME,
                 {"name": "kind", "in": "query", "required": False,
                  "schema": {"type": "string", "enum": ["queue", "topic"]}},
                 {"name": "subject", "in": "query", "required": False,
                  "description": "a topic message's subject",
                  "schema": {"type": "string", "maxLength": MAX_SUBJECT_CHARS}},
                 {"name": "attribute", "in": "query", "required": False,
                  "description": "KEY=VALUE message attributes (names starting with "
                                 "'nimbus.' are reserved)",
                  "style": "form", "explode": True,
                  "schema": {"type": "array", "maxItems": MAX_ATTRIBUTES,
                             "items": {"type": "string", "pattern": "^[^=]+=.*$"}}},
                 _IDEMPOTENCY],
                {"required": False, "description": "the message body (any bytes)",
                 "content": {"application/octet-stream": {"schema": {
                     "type": "string", "format": "binary"}}}})},
        },
    }
