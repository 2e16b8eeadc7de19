"""The gRPC servicer: thin; the flows live in verify.py and confirm.py."""

from __future__ import annotations

from typing import Any

from otpgate.verification.v1 import verification_pb2, verification_pb2_grpc

from services.verification.confirm import Confirmer
from services.verification.listing import list_verifications
from services.verification.verify import Verifier

Context = Any  # grpc.aio.ServicerContext


class VerificationServicer(verification_pb2_grpc.VerificationServiceServicer):
    def __init__(self, verifier: Verifier, confirmer: Confirmer) -> None:
        self.verifier = verifier
        self.confirmer = confirmer

    async def StartPhoneConfirmation(
        self, request: verification_pb2.StartPhoneConfirmationRequest, context: Context
    ) -> verification_pb2.StartPhoneConfirmationResponse:
        return await self.confirmer.start(request)

    async def SubmitConfirmationCode(
        self, request: verification_pb2.SubmitConfirmationCodeRequest, context: Context
    ) -> verification_pb2.SubmitConfirmationCodeResponse:
        return await self.confirmer.submit(request)

    async def StartVerification(
        self, request: verification_pb2.StartVerificationRequest, context: Context
    ) -> verification_pb2.StartVerificationResponse:
        return await self.verifier.start(request)

    async def CheckVerification(
        self, request: verification_pb2.CheckVerificationRequest, context: Context
    ) -> verification_pb2.CheckVerificationResponse:
        view, approved = await self.verifier.check(request.client_id, request.id, request.code)
        return verification_pb2.CheckVerificationResponse(verification=self.verifier.to_proto(view), approved=approved)

    async def CancelVerification(
        self, request: verification_pb2.CancelVerificationRequest, context: Context
    ) -> verification_pb2.CancelVerificationResponse:
        view = await self.verifier.cancel(request.client_id, request.id)
        return verification_pb2.CancelVerificationResponse(verification=self.verifier.to_proto(view))

    async def GetVerification(
        self, request: verification_pb2.GetVerificationRequest, context: Context
    ) -> verification_pb2.GetVerificationResponse:
        view = await self.verifier.get(request.client_id, request.id)
        return verification_pb2.GetVerificationResponse(verification=self.verifier.to_proto(view))

    async def ListVerifications(
        self, request: verification_pb2.ListVerificationsRequest, context: Context
    ) -> verification_pb2.ListVerificationsResponse:
        return await list_verifications(self.verifier, request)
