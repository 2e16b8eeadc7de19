"""The bootstrap serves health, turns ServiceError into a rich status and propagates request ids."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from otpgate.directory.v1 import directory_pb2, directory_pb2_grpc

from services.core import errors
from services.core.grpc_client import make_channel
from services.core.grpc_server import ServiceApp, start_service
from services.core.logging import request_id_var


class _Directory(directory_pb2_grpc.DirectoryServiceServicer):
    def __init__(self) -> None:
        self.seen_request_ids: list[str] = []

    async def GetSubscriber(self, request, context):  # type: ignore[no-untyped-def]
        self.seen_request_ids.append(request_id_var.get())
        raise errors.invalid_argument([("phone", "must be E.164")])


async def test_rich_errors_health_and_request_id() -> None:
    servicer = _Directory()
    app = ServiceApp(
        name="directory",
        servicers=[
            (
                directory_pb2_grpc.add_DirectoryServiceServicer_to_server,
                servicer,
                "otpgate.directory.v1.DirectoryService",
            )
        ],
    )
    running = await start_service(app, "127.0.0.1", 0)
    try:
        channel = make_channel(running.address, [directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"]])
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="otpgate.directory.v1.DirectoryService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        stub = directory_pb2_grpc.DirectoryServiceStub(channel)
        token = request_id_var.set("rid-123")
        try:
            await stub.GetSubscriber(directory_pb2.GetSubscriberRequest(phone="x"))
            raise AssertionError("expected INVALID_ARGUMENT")
        except grpc.aio.AioRpcError as error:
            failure = errors.parse_rpc_error(error)
        finally:
            request_id_var.reset(token)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.reason == "INVALID_ARGUMENT"
        assert failure.field_violations == [("phone", "must be E.164")]
        assert servicer.seen_request_ids == ["rid-123"]
        await channel.close()
    finally:
        await running.stop(0)


def _add_by_generic_handler_only(servicer: _Directory, server: grpc.aio.Server) -> None:
    """A registration that gives the server only a generic handler (no methods registered by name)."""
    method = grpc.unary_unary_rpc_method_handler(
        servicer.GetSubscriber,
        request_deserializer=directory_pb2.GetSubscriberRequest.FromString,
        response_serializer=directory_pb2.GetSubscriberResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("otpgate.directory.v1.DirectoryService", {"GetSubscriber": method}),)
    )


async def test_a_generic_handler_is_served_like_a_registered_method() -> None:
    servicer = _Directory()
    app = ServiceApp(
        name="directory",
        servicers=[(_add_by_generic_handler_only, servicer, "otpgate.directory.v1.DirectoryService")],
    )
    running = await start_service(app, "127.0.0.1", 0)
    channel = make_channel(running.address, [directory_pb2.DESCRIPTOR.services_by_name["DirectoryService"]])
    try:
        stub = directory_pb2_grpc.DirectoryServiceStub(channel)
        token = request_id_var.set("rid-generic")
        try:
            for _ in range(2):  # the second call takes the wrapped handler kept from the first
                try:
                    await stub.GetSubscriber(directory_pb2.GetSubscriberRequest(phone="x"))
                    raise AssertionError("expected INVALID_ARGUMENT")
                except grpc.aio.AioRpcError as error:
                    failure = errors.parse_rpc_error(error)
                assert failure.field_violations == [("phone", "must be E.164")]
        finally:
            request_id_var.reset(token)
        assert servicer.seen_request_ids == ["rid-generic", "rid-generic"]
    finally:
        await channel.close()
        await running.stop(0)
