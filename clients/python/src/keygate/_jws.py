"""Compact JWS signing for the two JWTs an agent makes: its client assertion
(RFC 7523, `private_key_jwt`) and DPoP proofs (RFC 9449). Signatures come
from `cryptography`; only the JOSE framing is here."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Any, Dict, Optional, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .errors import ConfigurationError

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_key(pem: bytes) -> PrivateKey:
    """An agent key: PKCS#8 PEM, EC P-256 (ES256) or Ed25519 (EdDSA). The
    error never quotes the file."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigurationError(
            "the agent key is not an unencrypted PKCS#8 PEM private key"
        ) from None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ConfigurationError("the agent key must be EC P-256 (ES256) or Ed25519 (EdDSA)")


def alg_of(key: PrivateKey) -> str:
    return "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else "ES256"


def public_jwk(key: PrivateKey) -> Dict[str, str]:
    """The public half as a JWK (RFC 7517), members in thumbprint order."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}
    numbers = key.public_key().public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def thumbprint(jwk: Dict[str, str]) -> str:
    """RFC 7638 thumbprint (`jkt`)."""
    required = ("crv", "kty", "x") if jwk["kty"] == "OKP" else ("crv", "kty", "x", "y")
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def sign(key: PrivateKey, header: Dict[str, Any], claims: Dict[str, Any]) -> str:
    header = {"alg": alg_of(key), **header}
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    ).encode("ascii")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(signing_input)
    else:
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input.decode("ascii") + "." + b64url(signature)


def client_assertion(key: PrivateKey, agent: str, audience: str, lifetime: int = 60) -> str:
    """RFC 7523 §3: iss = sub = the agent, aud = the token endpoint, a
    unique jti, short-lived."""
    now = int(time.time())
    return sign(
        key,
        {"typ": "JWT"},
        {
            "iss": agent,
            "sub": agent,
            "aud": audience,
            "iat": now,
            "exp": now + lifetime,
            "jti": str(uuid.uuid4()),
        },
    )


def dpop_proof(key: PrivateKey, method: str, url: str, access_token: Optional[str]) -> str:
    """RFC 9449 §4.2: a single-use proof for this method and URL (no query),
    over the access token it accompanies (`ath`)."""
    claims: Dict[str, Any] = {
        "jti": str(uuid.uuid4()),
        "htm": method.upper(),
        "htu": url.split("?", 1)[0].split("#", 1)[0],
        "iat": int(time.time()),
    }
    if access_token is not None:
        claims["ath"] = b64url(hashlib.sha256(access_token.encode()).digest())
    return sign(key, {"typ": "dpop+jwt", "jwk": public_jwk(key)}, claims)
