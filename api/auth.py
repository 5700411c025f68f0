"""Authentication: X-API-Key, Bearer/token, and Backend.AI HMAC-SHA256 request signing, all
checked against the same keypairs (API.md "Start-up, keys and auth")."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

from tornado.httputil import HTTPServerRequest

from bridge.errors import AuthFailed, InvalidRequest
from bridge.keypairs import Keypair, Keypairs
from bridge.replicas import Replicas

# Set by a replica that forwards a request it authenticated (api/forward.py); signed with the
# cluster secret, so a client cannot make one.
IDENTITY_HEADER = "X-KB-Forwarded-Identity"

CLOCK_SKEW = timedelta(minutes=15)
# Since v4.20181215 the body is never part of the signature (backendai.md §4).
UNSIGNED_BODY_SINCE = "v4.20181215"
SIGN_METHODS = {"HMAC-SHA256": "sha256"}  # signMethod → hashlib name


class MissingCredentials(AuthFailed):
    def __init__(self) -> None:
        super().__init__("No credentials: send X-API-Key, Authorization: Bearer <key>, or a "
                         "Backend.AI signature.")


class BadSignatureParams(InvalidRequest):
    pass


async def authenticate(request: HTTPServerRequest, keypairs: Keypairs,
                       replicas: Replicas | None = None) -> Keypair:
    """The keypair a request acts as. Raises AuthFailed (401) or BadSignatureParams (400)."""
    headers = request.headers
    forwarded = headers.get(IDENTITY_HEADER)
    if forwarded is not None:
        # Only the signature counts: a replica vouches for a client it authenticated itself.
        # A request carrying the header is judged by it alone, never by other credentials.
        if replicas is None:
            raise AuthFailed("Forwarded identity refused: this server is not a replica.")
        identity = replicas.verify(forwarded, request.method or "GET", request.uri or "/")
        kp = await keypairs.authenticate_access(identity.access_key)
        if not kp.is_active:
            raise AuthFailed("This keypair is inactive.")
        return kp
    api_key = headers.get("X-API-Key")
    if api_key:
        return await keypairs.authenticate_secret(api_key)
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    value = value.strip()
    if scheme.lower() in ("bearer", "token") and value:
        return await keypairs.authenticate_secret(value)
    if scheme in ("BackendAI", "Sorna"):
        fields = dict(p.strip().split("=", 1) for p in value.split(",") if "=" in p)
        await keypairs.authenticate_access(fields.get("credential", "").partition(":")[0])
        return _verify_signature(request, fields, keypairs)
    token = request.query_arguments.get("token")  # browsers cannot set WebSocket headers
    if token:
        return await keypairs.authenticate_secret(token[0].decode(errors="replace"))
    raise MissingCredentials()


def _verify_signature(request: HTTPServerRequest, fields: dict[str, str],
                      keypairs: Keypairs) -> Keypair:
    sign_method = fields.get("signMethod", "")
    access_key, _, signature = fields.get("credential", "").partition(":")
    if not signature:
        raise BadSignatureParams("Malformed Authorization header: expected "
                                 "'BackendAI signMethod=HMAC-SHA256, credential=<AK>:<sig>'.")
    # What the SDK signs with, and nothing else: no weaker hash, no hash a digest cannot take.
    if sign_method.upper() not in SIGN_METHODS:
        raise AuthFailed(f"Unsupported signature method {sign_method!r}: only "
                         f"{', '.join(SIGN_METHODS)}.")
    hash_type = SIGN_METHODS[sign_method.upper()]
    raw_date = request.headers.get("Date") or request.headers.get("X-BackendAI-Date", "")
    try:
        date = datetime.fromisoformat(raw_date.replace("Z", "+00:00"))
    except ValueError:
        raise BadSignatureParams(f"Date header {raw_date!r} is not an ISO 8601 date.") from None
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    if abs(datetime.now(UTC) - date) > CLOCK_SKEW:
        raise BadSignatureParams("Date/time sync error: the request's date is more than 15 "
                                 "minutes away from the server's.")
    kp = keypairs.get(access_key)
    if not kp.is_active:
        raise AuthFailed("This keypair is inactive.")
    version = request.headers.get("X-BackendAI-Version", "")
    body = b""
    # The SDK signs WebSocket and event-stream requests as application/octet-stream but sends
    # no Content-Type with them; every other request carries the type it signed.
    ctype = request.headers.get("Content-Type", "application/octet-stream")
    ctype = ctype.split(";")[0].strip().lower()
    if version < UNSIGNED_BODY_SINCE and ctype != "multipart/form-data":
        body = request.body
    expected = sign(method=request.method or "GET", path=request.uri or "/", raw_date=raw_date,
                    date=date, host=request.host, content_type=ctype, version=version,
                    body=body, secret=kp.secret_key, hash_type=hash_type)
    if not hmac.compare_digest(expected, signature):
        raise AuthFailed("Signature mismatch.")
    return kp


def sign(*, method: str, path: str, raw_date: str, date: datetime, host: str,
         content_type: str, version: str, body: bytes, secret: str, hash_type: str) -> str:
    """The Backend.AI request signature (backendai.md §4.1, §4.3)."""
    body_hash = hashlib.new(hash_type, body).hexdigest()
    to_sign = (f"{method.upper()}\n{path}\n{raw_date}\nhost:{host}\ncontent-type:{content_type}"
               f"\nx-backendai-version:{version}\n{body_hash}").encode()
    key = hmac.new(secret.encode(), date.strftime("%Y%m%d").encode(), hash_type).digest()
    key = hmac.new(key, host.encode(), hash_type).digest()
    return hmac.new(key, to_sign, hash_type).hexdigest()
