"""``GrpcMover``: carries out the controller's moves through the node agents' gRPC API.

Every move is PrepareMove, then CompleteMove; AbortMove on any failure after a
prepare was sent (its answer says which of Complete and Abort won, so a lost
CompleteMove reply is not mistaken for a failure). Each move has a fresh uuid
and a lease, so a controller that dies mid-move leaks nothing: the agent aborts
on its own when the lease runs out.

Which agent: the one on the node of the move's per-replica end (src first), or,
for moves between cluster-wide tiers (dropping a shared copy), any agent. The
agents count moves and their failures (``lull:kv_moves`` ...); this class does not.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping

import grpc

from controller.policy import Location, Move, SourceLost, Tier
from controller.runtime.contracts import NotWrittenThrough
from proto.internal_auth import agent_channel
from proto.telemetry import tracing
from proto import node_agent_pb2 as pb
from proto import node_agent_pb2_grpc as pb_grpc
from proto import tiers_pb2

log = logging.getLogger(__name__)



class GrpcMover:
    def __init__(self, agents: Mapping[str, str], *, lease_s: float = 60.0, timeout_s: float = 30.0,
                 bytes_per_token: int = 0) -> None:
        """``agents``: node id -> "host:port" of its agent. ``timeout_s`` bounds each
        call; ``lease_s`` bounds how long an abandoned prepare holds the source."""
        if not 0 < lease_s <= 600 or timeout_s <= 0:
            raise ValueError(f"need 0 < lease_s <= 600 and timeout_s > 0; got {lease_s}, {timeout_s}")
        self.addresses = dict(agents)
        self.lease_s, self.timeout_s, self.bytes_per_token = lease_s, timeout_s, bytes_per_token
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.NodeAgentServiceStub]] = {}
        self._retired: list[grpc.aio.Channel] = []

    def forget_agent(self, node_id: str) -> None:
        """The node is gone: its agent is asked nothing again (cluster-wide moves go elsewhere)."""
        self.addresses.pop(node_id, None)
        old = self._stubs.pop(node_id, None)
        if old is not None:
            self._retired.append(old[0])

    def set_agent(self, node_id: str, address: str) -> None:
        """A node's agent (re)started at ``address``."""
        self.addresses[node_id] = address
        old = self._stubs.pop(node_id, None)
        if old is not None:
            self._retired.append(old[0])  # closed by close(): closing is a coroutine

    async def close(self) -> None:
        for channel in [c for c, _ in self._stubs.values()] + self._retired:
            await channel.close()
        self._stubs.clear()
        self._retired.clear()

    async def move(self, move: Move, src_node: str | None, dst_node: str | None) -> bool:
        if move.src.tier is Tier.WAITING:
            return True  # nothing to copy: the engine recomputes the prompt
        if move.dst.tier is Tier.WAITING:
            kind = pb.MOVE_KIND_DROP
        else:
            kind = pb.MOVE_KIND_PROMOTE if move.is_promotion else pb.MOVE_KIND_DEMOTE
        request = pb.PrepareMoveRequest(
            move_id=uuid.uuid4().hex, session_id=move.session_id, kind=kind,
            src=_location(move.src, src_node), dst=_location(move.dst, dst_node),
            kv_bytes=move.tokens * self.bytes_per_token, lease_s=self.lease_s)
        with tracing.tracer().start_as_current_span(tracing.SPAN_KV_MOVE, attributes={
                tracing.ATTR_SESSION: move.session_id, tracing.ATTR_SRC_TIER: move.src.tier.label,
                tracing.ATTR_DST_TIER: move.dst.tier.label, tracing.ATTR_BYTES: request.kv_bytes}) as span:
            try:
                committed = await self._two_phase(request, src_node or dst_node)
            except SourceLost:
                # What is left of the copy (an index entry, some blocks) goes too: the tiers
                # never drop a booked copy on their own.
                await self.release(move.session_id, move.src, src_node)
                raise
            span.set_attribute("lull.kv.committed", committed)
            return committed

    async def release(self, session_id: str, where: Location, node: str | None) -> bool:
        if where.tier is Tier.WAITING:
            return True
        request = pb.PrepareMoveRequest(
            move_id=uuid.uuid4().hex, session_id=session_id, kind=pb.MOVE_KIND_DROP,
            src=_location(where, node), dst=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_WAITING),
            lease_s=self.lease_s)
        return await self._two_phase(request, node)

    async def report(self, node_id: str) -> pb.OccupancyReport:
        """The node's whole report: StreamOccupancy's chunks (one snapshot) in one message,
        which may exceed gRPC's 4 MB limit in memory, never on the wire."""
        report = None
        async for chunk in self._stub(node_id).StreamOccupancy(pb.ReportOccupancyRequest(), timeout=self.timeout_s):
            if report is None:
                report = chunk
            else:
                report.sessions.extend(chunk.sessions)
        if report is None:
            raise LookupError(f"the agent of node {node_id!r} sent an empty occupancy stream")
        return report

    async def health(self, node_id: str | None = None) -> pb.HealthResponse:
        """The agent's Health (None: any agent's): its shared-tier link and that tier's instance."""
        return await self._stub(node_id).Health(pb.HealthRequest(), timeout=self.timeout_s)

    async def abort(self, node_id: str, move_ids: list[str], reason: str) -> None:
        """Abort moves prepared by a controller that is gone (a restart)."""
        for move_id in move_ids:
            await self._stub(node_id).AbortMove(pb.AbortMoveRequest(move_id=move_id, reason=reason),
                                                timeout=self.timeout_s)

    async def _two_phase(self, request: pb.PrepareMoveRequest, node_id: str | None) -> bool:
        what = f"move {request.move_id} of {request.session_id}"
        try:
            stub = self._stub(node_id)
        except LookupError as e:
            log.warning("%s not sent: %s", what, e)
            return False
        try:
            prepared = await stub.PrepareMove(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            log.warning("%s: PrepareMove failed (%s): %s", what, e.code().name, e.details())
            return await self._abort(stub, request.move_id, "prepare failed")
        if prepared.WhichOneof("outcome") != "reserved":
            refusal = prepared.refused
            log.info("%s refused: %s (%s)", what, pb.RefusalReason.Name(refusal.reason), refusal.message)
            if refusal.reason == pb.REFUSAL_REASON_SOURCE_NOT_FOUND and request.kind != pb.MOVE_KIND_DROP:
                if request.src.tier in (tiers_pb2.TIER_DRAM, tiers_pb2.TIER_SHARED):
                    raise SourceLost(refusal.message)  # gone off-GPU: no retry brings it back
                raise NotWrittenThrough(refusal.message)  # the controller decides: wait, or recompute
            return False
        try:
            done = await stub.CompleteMove(pb.CompleteMoveRequest(move_id=request.move_id), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            log.warning("%s: CompleteMove failed (%s): %s", what, e.code().name, e.details())
            return await self._abort(stub, request.move_id, "complete failed")
        if done.state != pb.MOVE_STATE_COMMITTED:
            log.info("%s not committed: %s %s", what, pb.MoveState.Name(done.state), done.message)
        return done.state == pb.MOVE_STATE_COMMITTED

    async def _abort(self, stub, move_id: str, reason: str) -> bool:
        """Roll back; True if the move had committed after all (Abort lost the race)."""
        try:
            answer = await stub.AbortMove(pb.AbortMoveRequest(move_id=move_id, reason=reason), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            # The lease expires on the agent; the books keep the source, which owns the KV
            # unless a commit got through: the next occupancy report tells.
            log.warning("abort of move %s failed (%s); its lease will expire", move_id, e.code().name)
            return False
        return answer.state == pb.MOVE_STATE_COMMITTED

    def _stub(self, node_id: str | None) -> pb_grpc.NodeAgentServiceStub:
        if node_id is None:  # a move between cluster-wide tiers: any agent reaches them
            if not self.addresses:
                raise LookupError("no node agent is known")
            node_id = sorted(self.addresses)[0]
        if node_id not in self._stubs:
            if node_id not in self.addresses:
                raise LookupError(f"no node agent known for node {node_id!r}")
            channel = agent_channel(self.addresses[node_id])  # every call carries LULL_INTERNAL_TOKEN
            self._stubs[node_id] = (channel, pb_grpc.NodeAgentServiceStub(channel))
        return self._stubs[node_id][1]


def _location(where: Location, node: str | None) -> tiers_pb2.KvLocation:
    return tiers_pb2.KvLocation(tier=where.tier.pb, replica_id=where.replica or "",
                                node_id=(node or "") if where.tier.per_replica else "")
