"""The client agrees with the broker's OpenAPI document: a class for every
stable error code, and the fields it reads are the ones the schemas
declare (and require, where the client cannot do without them)."""

from __future__ import annotations

import httpx

import keygate

# What the client reads from each answer (`_model.py`), and whether it
# needs the field to be there.
READS = {
    "TokenResponse": {"access_token": True, "token_type": True, "expires_in": True, "task_id": True,
                      "issued_token_type": False},
    "IssuedBody": {"lease_id": True, "scope": True, "provider": True, "expires_at": True,
                   "revocation": True, "credential": True, "note": False},
    "AgentApprovalView": {"approval_id": True, "status": True, "scope": False, "required": True,
                          "expires_at": True, "reason": False},
    "RenewedLease": {"lease_id": True, "expires_at": True, "not_after": True},
    "ReleasedLease": {"lease_id": True, "state": True, "lives_until": False, "note": False},
    "CompletedTask": {"task_id": True, "state": True, "leases": True, "lives_until": False},
    "ErrorBody": {"error": True, "message": True, "policies": False},
    "OAuthErrorBody": {"error": True, "error_description": True},
}


def document(broker) -> dict:
    resp = httpx.get(f"{broker.url}/openapi.json")
    assert resp.status_code == 200
    return resp.json()


def test_every_documented_error_code_has_its_class_and_no_class_is_undocumented(broker):
    schemas = document(broker)["components"]["schemas"]
    documented = set(schemas["ErrorCode"]["enum"]) | set(schemas["OAuthErrorCode"]["enum"])
    assert documented == set(keygate.ERRORS)


def test_the_fields_the_client_reads_are_declared_and_required(broker):
    schemas = document(broker)["components"]["schemas"]
    for name, reads in READS.items():
        schema = schemas[name]
        props = set(schema.get("properties", {}))
        required = set(schema.get("required", []))
        for field, needed in reads.items():
            assert field in props, f"{name}.{field} is not in the document"
            if needed:
                assert field in required, f"{name}.{field} is read as required but the document makes it optional"


def test_the_approval_states_the_client_handles_are_the_documented_ones(broker):
    schemas = document(broker)["components"]["schemas"]
    assert set(schemas["ApprovalState"]["enum"]) == {"pending", "approved", "denied", "expired", "cancelled"}


def test_the_agent_operations_the_client_calls_are_documented(broker):
    paths = document(broker)["paths"]
    for method, path in [
        ("get", "/.well-known/oauth-authorization-server"),
        ("post", "/oauth/token"),
        ("get", "/v1/session"),
        ("post", "/v1/credentials"),
        ("delete", "/v1/credentials/{lease_id}"),
        ("post", "/v1/credentials/{lease_id}/renew"),
        ("post", "/v1/tasks/complete"),
        ("get", "/v1/approvals/{id}"),
        ("post", "/v1/approvals/{id}/redeem"),
    ]:
        assert method in paths.get(path, {}), f"{method.upper()} {path}"
