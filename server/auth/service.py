"""The TokenService servicer: trades the API key a call is authenticated with for a token.

The auth interceptor has already checked the key by the time IssueToken
runs; this only refuses tokens (a token cannot mint its successor, so a
stolen token dies with its expiry) and signs. Errors cross the servicer's
one error boundary like every other RPC's.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from llmgateway.v1 import token_pb2 as pb
from llmgateway.v1 import token_pb2_grpc as pb_grpc
from server.auth.tokens import NoSigningKeyError, TokenIssuer
from server.errors import AuthDisabledError, InternalError, PermissionDeniedError
from server.grpc_edge.servicer import error_boundary
from server.identity import current_identity
from server.telemetry.audit import PERMISSION_DENIED, TOKEN_ISSUED, audit_event, peer_of

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TokenService"].full_name


class TokenServicer(pb_grpc.TokenServiceServicer):
    """Serves llmgateway.v1.TokenService; `issuer` is None when auth is disabled."""

    def __init__(self, issuer: TokenIssuer | None) -> None:
        self._issuer = issuer

    async def IssueToken(
        self, request: pb.IssueTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.IssueTokenResponse:
        async with error_boundary(context):
            if self._issuer is None:
                raise AuthDisabledError()
            identity = current_identity()
            if identity is None or identity.credential != "api_key":
                audit_event(
                    PERMISSION_DENIED,
                    method="IssueToken",
                    key_id=identity.key_id if identity else "",
                    reason="TOKEN_CANNOT_RENEW",
                    peer=peer_of(context),
                )
                raise PermissionDeniedError(
                    "IssueToken takes an API key; a token cannot renew itself"
                )
            lifetime = request.lifetime.ToTimedelta().total_seconds()
            try:
                issued = await self._issuer.issue(identity, lifetime if lifetime > 0 else None)
            except NoSigningKeyError as err:
                log.error("cannot issue tokens: %s", err)
                raise InternalError("the gateway cannot issue tokens right now") from None
            audit_event(
                TOKEN_ISSUED,
                key_id=identity.key_id,
                expires_at=issued.expires_at,
                lifetime_s=round(issued.expires_at - issued.issued_at, 3),
                peer=peer_of(context),
            )
            expire_time = timestamp_pb2.Timestamp()
            expire_time.FromSeconds(int(issued.expires_at))
            remaining = duration_pb2.Duration()
            remaining.FromNanoseconds(int((issued.expires_at - issued.issued_at) * 1e9))
            return pb.IssueTokenResponse(
                token=issued.token, expire_time=expire_time, lifetime=remaining
            )
        return pb.IssueTokenResponse()  # error_boundary has set the failure's status
