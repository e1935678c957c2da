"""AWS Signature Version 4, checked: what lets boto3 call the Lambda Invoke API.

Pure functions, no I/O: the caller hands over the request as it arrived
(method, the raw path as sent on the wire, the raw query string, the
headers, the body) and ``now``. Two forms are accepted:

- the ``Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=...,
  Signature=...`` header (what boto3 sends), with ``X-Amz-Date``;
- a presigned URL: ``X-Amz-Algorithm``, ``X-Amz-Credential``,
  ``X-Amz-Date``, ``X-Amz-Expires``, ``X-Amz-SignedHeaders`` and
  ``X-Amz-Signature`` in the query (its body is not signed, as on AWS).

The canonical request is built as AWS (and botocore) build it for every
service but S3: the path with dot segments and repeated slashes removed,
then URI-encoded once more (so ``%3A`` on the wire is ``%253A`` here); the
query pairs decoded, encoded again with AWS's unreserved set, sorted; the
signed headers lower-cased with their values' runs of blanks made one
space; the payload hash ``x-amz-content-sha256`` (which must then match
the body) or the body's SHA-256. The signing key comes from the secret,
the scope's date, its region (any region is accepted) and its service,
which must be ``lambda``. The date must be within ``MAX_SKEW_S`` of
``now``; signatures are compared in constant time.

Credentials are not stored anywhere: :func:`credentials_for` derives one
access key id and its secret from the control token with HMAC, so the
server and ``nimbus aws-credentials`` agree without sharing more than
the token they already share.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "lambda"
MAX_SKEW_S = 15 * 60
MAX_EXPIRES_S = 7 * 24 * 3600  # a presigned URL's longest life, as on AWS
ACCESS_KEY_PREFIX = "NIMB"
_DATE = re.compile(r"\d{8}T\d{6}Z")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


class SignatureError(Exception):
    """The request is not signed as it must be. ``error_type`` is AWS's
    name for the failure (``InvalidSignatureException``,
    ``UnrecognizedClientException``, ``MissingAuthenticationTokenException``,
    ``IncompleteSignatureException``); the message says what was wrong."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def _invalid(message: str) -> SignatureError:
    return SignatureError("InvalidSignatureException", message)


def _incomplete(message: str) -> SignatureError:
    return SignatureError("IncompleteSignatureException", message)


def credentials_for(token: str) -> tuple[str, str]:
    """The access key id and secret access key that go with a control token:
    ``NIMB`` + 16 upper-case base32 characters, and 40 characters of
    URL-safe base64. The same token always gives the same pair; neither
    reveals the token."""
    key = token.strip().encode()
    kid = hmac.new(key, b"nimbus aws access key id", hashlib.sha256).digest()
    secret = hmac.new(key, b"nimbus aws secret access key", hashlib.sha256).digest()
    access_key_id = ACCESS_KEY_PREFIX + base64.b32encode(kid).decode()[:16]
    return access_key_id, base64.urlsafe_b64encode(secret).decode()[:40]


@dataclass(frozen=True, slots=True)
class Verified:
    """Who signed, and for which scope."""

    access_key_id: str
    date: str  # YYYYMMDD of the scope
    region: str


# -- canonical request ----------------------------------------------------------


def canonical_path(raw_path: str) -> str:
    """The path as AWS signs it (every service but S3): dot segments and
    empty segments removed, then URI-encoded (``/`` and ``~`` kept)."""
    if not raw_path:
        return "/"
    parts: list[str] = []
    for seg in raw_path.split("/"):
        if not seg or seg == ".":
            continue
        if seg == "..":
            if parts:
                parts.pop()
        else:
            parts.append(seg)
    path = ("/" if raw_path[0] == "/" else "") + "/".join(parts)
    if raw_path[-1] == "/" and parts:
        path += "/"
    return quote(path, safe="/~")


def query_pairs(raw_query: str) -> list[tuple[str, str]]:
    """The raw query's (name, value) pairs, percent-decoded (``+`` stays a plus)."""
    pairs = []
    for item in raw_query.split("&"):
        if not item:
            continue
        key, _, value = item.partition("=")
        pairs.append((unquote(key), unquote(value)))
    return pairs


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    encoded = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _trim(value: str) -> str:
    return " ".join(value.split())


def canonical_headers(signed: list[str], get_all: Callable[[str], list[str]]) -> str:
    lines = []
    for name in signed:
        values = get_all(name)
        if not values:
            raise _invalid(f"the signed header {name!r} is not in the request")
        lines.append(f"{name}:{','.join(_trim(v) for v in values)}")
    return "\n".join(lines) + "\n"


def canonical_request(method: str, raw_path: str, pairs: Iterable[tuple[str, str]],
                      signed: list[str], get_all: Callable[[str], list[str]],
                      payload_hash: str) -> str:
    return "\n".join([method.upper(), canonical_path(raw_path), canonical_query(pairs),
                      canonical_headers(signed, get_all), ";".join(signed), payload_hash])


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope,
                      hashlib.sha256(canonical.encode()).hexdigest()])


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def signature(secret: str, date: str, region: str, service: str, to_sign: str) -> str:
    return hmac.new(signing_key(secret, date, region, service), to_sign.encode(),
                    hashlib.sha256).hexdigest()


# -- checking ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Claim:
    access_key_id: str
    date: str
    region: str
    service: str
    signed: list[str]
    signature: str
    amz_date: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/aws4_request"


def _credential(text: str) -> tuple[str, str, str, str]:
    parts = text.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request" or not all(parts):
        raise _incomplete("the credential must be ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/"
                          f"aws4_request, got {text[:120]!r}")
    return parts[0], parts[1], parts[2], parts[3]


def _signed_list(text: str) -> list[str]:
    names = text.split(";")
    if not all(_HEADER_NAME.fullmatch(n) for n in names):
        raise _incomplete(f"SignedHeaders must be lower-case header names joined by ';', "
                          f"got {text[:200]!r}")
    if names != sorted(set(names)):
        raise _invalid("SignedHeaders must be sorted and without repeats")
    if "host" not in names:
        raise _invalid("the host header must be signed")
    return names


def _from_header(authorization: str, amz_date: str | None) -> _Claim:
    algorithm, _, rest = authorization.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise _incomplete(f"only {ALGORITHM} signatures are accepted, the Authorization "
                          f"header says {algorithm[:40]!r}")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key in fields:
            raise _incomplete(f"malformed Authorization header field {item.strip()[:80]!r}")
        fields[key] = value
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if k not in fields]
    if missing:
        raise _incomplete(f"the Authorization header lacks {', '.join(missing)}")
    if amz_date is None:
        raise _incomplete("the X-Amz-Date header is missing")
    kid, date, region, service = _credential(fields["Credential"])
    signed = _signed_list(fields["SignedHeaders"])
    if "x-amz-date" not in signed:
        raise _invalid("the x-amz-date header must be signed")
    return _Claim(kid, date, region, service, signed, fields["Signature"], amz_date)


def _parse_date(amz_date: str) -> float:
    if not _DATE.fullmatch(amz_date):
        raise _incomplete(f"X-Amz-Date must be YYYYMMDDTHHMMSSZ, got {amz_date[:40]!r}")
    try:
        return datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise _incomplete(f"X-Amz-Date is not a date: {amz_date!r}") from None


def verify(method: str, raw_path: str, raw_query: str,
           headers: Iterable[tuple[str, str]], body: bytes, *,
           secrets: Callable[[str], str | None], now: float) -> Verified:
    """Check a request's signature. ``headers`` are (name, value) pairs as
    received (any case, repeats allowed); ``secrets`` maps an access key id
    to its secret (None: unknown). Raises :class:`SignatureError`."""
    return precheck(method, raw_path, raw_query, headers, secrets=secrets, now=now).finish(body)


@dataclass(frozen=True, slots=True)
class Signed:
    """A request whose signature's form, date, scope and key are good: what
    is left is the signature itself, over the body (:meth:`finish`)."""

    method: str
    raw_path: str
    pairs: list[tuple[str, str]]
    claim: _Claim
    secret: str
    get_all: Callable[[str], list[str]]

    def finish(self, body: bytes) -> Verified:
        claim = self.claim
        payload = _payload_hash(self.get_all("x-amz-content-sha256"), body)
        canonical = canonical_request(self.method, self.raw_path, self.pairs, claim.signed,
                                      self.get_all, payload)
        expected = signature(self.secret, claim.date, claim.region, claim.service,
                             string_to_sign(claim.amz_date, claim.scope, canonical))
        if not hmac.compare_digest(expected, claim.signature):
            raise _invalid("The request signature we calculated does not match the signature "
                           "you provided. Check your AWS Secret Access Key and signing method.")
        return Verified(claim.access_key_id, claim.date, claim.region)


def precheck(method: str, raw_path: str, raw_query: str,
             headers: Iterable[tuple[str, str]], *,
             secrets: Callable[[str], str | None], now: float) -> Signed:
    """Everything :func:`verify` checks before it needs the body: a request
    without a known key and a current date is refused before its body is
    read."""
    table: dict[str, list[str]] = {}
    for name, value in headers:
        table.setdefault(name.lower(), []).append(value)

    def get_all(name: str) -> list[str]:
        return table.get(name, [])

    pairs = query_pairs(raw_query)
    query = dict(pairs)
    authorization = get_all("authorization")
    presigned = "X-Amz-Signature" in query
    if authorization and presigned:
        raise _invalid("sign with the Authorization header or in the query, not both")
    if presigned:
        claim = _from_query(query)
        pairs = [(k, v) for k, v in pairs if k != "X-Amz-Signature"]
    elif authorization:
        if len(authorization) > 1:
            raise _incomplete("more than one Authorization header")
        dates = get_all("x-amz-date")
        claim = _from_header(authorization[0], dates[0] if len(dates) == 1 else None)
    else:
        raise SignatureError("MissingAuthenticationTokenException",
                             "Missing Authentication Token: sign the request with AWS "
                             "Signature Version 4 (the keys `nimbus aws-credentials` prints)")
    when = _parse_date(claim.amz_date)
    if claim.date != claim.amz_date[:8]:
        raise _invalid(f"the credential's date {claim.date} is not the date of X-Amz-Date "
                       f"{claim.amz_date}")
    if claim.service != SERVICE:
        raise _invalid(f"Credential should be scoped to correct service: '{SERVICE}', "
                       f"not {claim.service[:40]!r}")
    # every x-amz-* header sent counts: one added after signing (say
    # X-Amz-Invocation-Type) could change what the call does
    unsigned = sorted(n for n in table if n.startswith("x-amz-") and n not in claim.signed
                      and n != "x-amz-content-sha256")  # checked against the body itself
    if unsigned:
        raise _invalid(f"header {unsigned[0]} is not signed: sign every x-amz-* header sent")
    if presigned:
        expires = query.get("X-Amz-Expires", "")
        if not (expires.isascii() and expires.isdigit() and 0 < int(expires) <= MAX_EXPIRES_S):
            raise _incomplete(f"X-Amz-Expires must be 1 to {MAX_EXPIRES_S} seconds")
        if now > when + int(expires) or when > now + MAX_SKEW_S:
            raise _invalid(f"Signature expired: the URL was signed at {claim.amz_date} "
                           f"for {expires} s")
    elif abs(now - when) > MAX_SKEW_S:
        raise _invalid(f"Signature expired: {claim.amz_date} is more than "
                       f"{MAX_SKEW_S // 60} minutes from the server's time "
                       f"{datetime.fromtimestamp(now, UTC).strftime('%Y%m%dT%H%M%SZ')}")
    if not _SIGNATURE.fullmatch(claim.signature):
        raise _incomplete("the signature must be 64 lower-case hex digits")
    secret = secrets(claim.access_key_id)
    if secret is None:
        raise SignatureError("UnrecognizedClientException",
                             "The security token included in the request is invalid: "
                             f"unknown access key id {claim.access_key_id[:40]!r}")
    return Signed(method, raw_path, pairs, claim, secret, get_all)


def _from_query(query: dict[str, str]) -> _Claim:
    missing = [k for k in ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date",
                           "X-Amz-Expires", "X-Amz-SignedHeaders") if k not in query]
    if missing:
        raise _incomplete(f"the presigned URL lacks {', '.join(missing)}")
    if query["X-Amz-Algorithm"] != ALGORITHM:
        raise _incomplete(f"only {ALGORITHM} signatures are accepted")
    kid, date, region, service = _credential(query["X-Amz-Credential"])
    signed = _signed_list(query["X-Amz-SignedHeaders"])
    return _Claim(kid, date, region, service, signed, query["X-Amz-Signature"],
                  query["X-Amz-Date"])


def _payload_hash(declared: list[str], body: bytes) -> str:
    """The body is always signed: a declared hash (``UNSIGNED-PAYLOAD``
    included) must be the body's own."""
    actual = hashlib.sha256(body).hexdigest()
    if not declared:
        return actual
    if len(declared) > 1:
        raise _invalid("more than one x-amz-content-sha256 header")
    value = declared[0].strip()
    if value != actual:
        raise _invalid("x-amz-content-sha256 does not match the body's SHA-256")
    return value
