"""Bedrock's side of the wire for the stand-in: SigV4 checked against a known secret (recomputed with botocore
from the bytes that arrived) and InvokeModel answers in Bedrock's own formats (JSON, binary event stream, errors)."""

from __future__ import annotations

import hmac
import json
import re

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from aibridge_gw.apis.bedrock.eventstream import CONTENT_TYPE, chunk_frame, exception_frame

from .mock_upstream import Reply, Seen

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                   r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$")


def signature_problem(seen: Seen, secret: str = SECRET_KEY, access_key: str = ACCESS_KEY,
                      region: str = REGION) -> str | None:
    """Why the request's SigV4 signature does not verify (None: it does), the way AWS checks it: the canonical
    request is rebuilt from the method, path, query, signed headers and body exactly as received."""
    m = _AUTH.match(seen.headers.get("authorization", ""))
    if m is None:
        return "no SigV4 Authorization header"
    key, date, reg, service, signed, given = m.groups()
    if (key, reg, service) != (access_key, region, "bedrock"):
        return f"credential scope {key}/{reg}/{service}"
    amz_date = seen.headers.get("x-amz-date", "")
    if not amz_date.startswith(date):
        return "x-amz-date does not match the credential scope"
    names = signed.split(";")
    if "host" not in names:
        return "host is not signed"
    headers = {n: seen.headers.get(n, "") for n in names}
    creds = Credentials(access_key, secret, seen.headers.get("x-amz-security-token"))
    for signer_class in (SigV4Auth, _PathAsSent):
        req = AWSRequest(seen.method, f"http://{seen.headers['host']}{seen.path}", data=seen.body, headers=headers)
        req.context["timestamp"] = amz_date
        signer = signer_class(creds, "bedrock", region)
        expected = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        if hmac.compare_digest(expected, given):
            return None
    return "signature mismatch"


class _PathAsSent(SigV4Auth):
    """The canonical path as sent, not encoded again. botocore (boto3, the AWS CLI) encodes the path a second time
    as SigV4 specifies (a model id's `%3A` signed as `%253A`); Anthropic's Bedrock SDK for JS (Claude Code) signs
    the decoded path encoded once (`%3A`). Bedrock accepts both, so the stand-in does too."""

    def _normalize_url_path(self, path):
        return path


def signature_check(seen: Seen) -> Reply | None:
    """MockUpstream.check: AWS's 403 for a request whose signature does not verify."""
    problem = signature_problem(seen)
    if problem is None:
        return None
    return bedrock_error(403, "InvalidSignatureException", f"The request signature we calculated does not match "
                                                           f"the signature you provided ({problem})")


def bedrock_error(status: int, name: str, message: str) -> Reply:
    return Reply(status, {"content-type": "application/json",
                          "x-amzn-errortype": f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/"},
                 json.dumps({"message": message}).encode())


def event_stream(sse_events: list[bytes], delay: float = 0.0, exception: tuple[str, str] | None = None) -> Reply:
    """An InvokeModelWithResponseStream answer carrying these Anthropic events, one frame per chunk."""
    frames = []
    for ev in sse_events:
        data = next(line[6:] for line in ev.decode().splitlines() if line.startswith("data: "))
        frames.append(chunk_frame(json.loads(data)))
    if exception is not None:
        frames.append(exception_frame(*exception))
    return Reply(200, {"content-type": CONTENT_TYPE, "x-amzn-requestid": "5e0c1f0e-bedrock-test"}, events=frames,
                 delay=delay)
