"""The SigV4 verifier against botocore's own signer: what botocore signs is
accepted; anything changed after signing (method, path, query, a signed
header, the body, the date, the key, the service) is refused."""

from __future__ import annotations

import datetime as dt
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from nimbus.control import sigv4
from nimbus.control.sigv4 import SignatureError, credentials_for, verify

TOKEN = "t" * 43
KID, SECRET = credentials_for(TOKEN)
WHEN = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
NOW = WHEN.timestamp()
ARN = "arn:aws:lambda:us-west-2:000000000000:function:echo:beta"
PATH = "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-west-2%3A000000000000%3Afunction" \
       "%3Aecho%3Abeta/invocations"


def secrets(kid: str) -> str | None:
    return SECRET if kid == KID else None


def signed(method: str = "POST", path: str = PATH, query: str = "Qualifier=%24LATEST",
           body: bytes = b'{"a": 1}', headers: dict[str, str] | None = None,
           secret: str = SECRET, kid: str = KID, service: str = "lambda",
           region: str = "us-west-2", presign: bool = False) -> AWSRequest:
    url = f"http://127.0.0.1:8081{path}" + (f"?{query}" if query else "")
    req = AWSRequest(method=method, url=url, data=body, headers={
        "X-Amz-Invocation-Type": "RequestResponse", "X-Amz-Log-Type": "Tail",
        "Content-Type": "application/json", **(headers or {})})
    creds = Credentials(kid, secret)
    signer = (SigV4QueryAuth(creds, service, region, expires=300) if presign
              else SigV4Auth(creds, service, region))
    with mock.patch("botocore.auth.get_current_datetime", return_value=WHEN.replace(tzinfo=None)):
        signer.add_auth(req)
    return req


def check(req: AWSRequest, *, method: str | None = None, path: str | None = None,
          query: str | None = None, body: bytes | None = None,
          headers: dict[str, str] | None = None, now: float = NOW) -> sigv4.Verified:
    parts = urlsplit(req.url)
    got: dict[str, Any] = {k.lower(): v for k, v in req.headers.items()}
    got.setdefault("host", parts.netloc)
    got.update(headers or {})
    return verify(method or req.method, path if path is not None else parts.path,
                  query if query is not None else parts.query,
                  list(got.items()), body if body is not None else (req.body or b""),
                  secrets=secrets, now=now)


def refused(req: AWSRequest, error_type: str = "InvalidSignatureException",
            **changes: Any) -> str:
    with pytest.raises(SignatureError) as err:
        check(req, **changes)
    assert err.value.error_type == error_type, str(err.value)
    return str(err.value)


def test_credentials_are_derived_from_the_token_alone():
    kid, secret = credentials_for(TOKEN)
    assert (kid, secret) == credentials_for(TOKEN + "\n")
    assert kid.startswith("NIMB") and len(kid) == 20 and kid[4:].isupper()
    assert set(kid[4:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert len(secret) == 40 and TOKEN not in secret
    other = credentials_for("u" * 43)
    assert other[0] != kid and other[1] != secret


def test_what_botocore_signs_is_accepted_in_any_region():
    ok = check(signed())
    assert (ok.access_key_id, ok.date, ok.region) == (KID, "20260301", "us-west-2")
    assert check(signed(region="local")).region == "local"
    assert check(signed(query="", body=b"")).access_key_id == KID
    # 14 minutes either side is still within the skew
    assert check(signed(), now=NOW + 14 * 60).region == "us-west-2"
    assert check(signed(), now=NOW - 14 * 60).region == "us-west-2"


def test_the_path_is_signed_as_botocore_encodes_it_twice():
    req = signed()
    assert sigv4.canonical_path(urlsplit(req.url).path).count("%253A") == 7
    # the same function named with its colons left as they are is another path
    refused(req, path=PATH.replace("%3A", ":"))


@pytest.mark.parametrize("change", [
    {"method": "PUT"},
    {"path": PATH.replace("beta", "prod")},
    {"query": "Qualifier=2"},
    {"query": "Qualifier=%24LATEST&extra=1"},
    {"headers": {"x-amz-invocation-type": "Event"}},
    {"headers": {"x-amz-log-type": "None"}},
    {"headers": {"host": "127.0.0.1:9999"}},
    {"headers": {"content-type": "text/plain"}},
])
def test_a_request_changed_after_signing_is_refused(change):
    assert "does not match" in refused(signed(), **change)


def test_a_changed_body_is_refused_with_or_without_a_declared_hash():
    assert "does not match" in refused(signed(), body=b'{"a": 2}')
    req = signed(headers={"X-Amz-Content-SHA256": "0" * 64})
    assert "x-amz-content-sha256" in refused(req)
    req = signed(headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    assert "x-amz-content-sha256" in refused(req)


def test_old_or_future_dates_are_refused():
    assert "expired" in refused(signed(), now=NOW + 16 * 60)
    assert "expired" in refused(signed(), now=NOW - 16 * 60)
    req = signed()
    assert "X-Amz-Date" in refused(req, "IncompleteSignatureException",
                                   headers={"x-amz-date": "yesterday"})
    # a signed date changed after signing (still within the skew)
    assert "does not match" in refused(req, headers={"x-amz-date": "20260301T120100Z"})
    # a date of another day than the credential's scope
    assert "is not the date" in refused(req, headers={"x-amz-date": "20260302T000100Z"},
                                        now=NOW + 12 * 3600)


def test_a_wrong_secret_an_unknown_key_or_another_service_is_refused():
    assert "does not match" in refused(signed(secret="x" * 40))
    assert "unknown access key id" in refused(signed(kid="AKIAEXAMPLE"),
                                              "UnrecognizedClientException")
    assert "'lambda'" in refused(signed(service="s3"))


def test_a_missing_or_malformed_authorization_is_refused():
    req = signed()
    del req.headers["Authorization"]
    assert "Missing Authentication Token" in refused(req, "MissingAuthenticationTokenException")
    req = signed()
    req.headers["Authorization"] = "Bearer abc"
    refused(req, "IncompleteSignatureException")
    req = signed()
    auth = req.headers["Authorization"]
    req.headers["Authorization"] = auth.replace("SignedHeaders=", "SignedHeaders=zzz;")
    refused(req)
    req.headers["Authorization"] = auth.replace("host;", "")
    assert "host" in refused(req)


def test_a_presigned_url_is_accepted_until_it_expires():
    req = signed(presign=True, body=b"", query="")
    assert "X-Amz-Signature=" in req.url and "Authorization" not in req.headers
    assert check(req).access_key_id == KID
    assert check(req, now=NOW + 299).region == "us-west-2"
    assert "expired" in refused(req, now=NOW + 301)
    assert "does not match" in refused(req, body=b"{}")
    parts = urlsplit(req.url)
    refused(req, query=parts.query.replace("X-Amz-Expires=300", "X-Amz-Expires=3000"))


def test_the_key_and_date_are_checked_before_the_body_is_needed():
    req = signed(kid="AKIAEXAMPLE")
    parts = urlsplit(req.url)
    headers = [(k, v) for k, v in req.headers.items()] + [("host", parts.netloc)]
    with pytest.raises(SignatureError) as err:
        sigv4.precheck("POST", parts.path, parts.query, headers, secrets=secrets, now=NOW)
    assert err.value.error_type == "UnrecognizedClientException"
    good = signed()
    parts = urlsplit(good.url)
    headers = [(k, v) for k, v in good.headers.items()] + [("host", parts.netloc)]
    pending = sigv4.precheck("POST", parts.path, parts.query, headers, secrets=secrets,
                             now=NOW)
    assert pending.finish(good.body).access_key_id == KID
    with pytest.raises(SignatureError):
        pending.finish(b"{}")
