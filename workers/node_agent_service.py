"""The node agent on the wire: the gRPC NodeAgentService over `NodeAgent`, and its Ray actor.

Input checks live here: a malformed request gets INVALID_ARGUMENT with a
message and never reaches the agent's state. Every id must be of the proto's
charset (``proto.names.ID_CHARSET``); a replica id, which names the folder of
that replica's control file, must also not be `.` or `..`. A call without the
internal token gets UNAUTHENTICATED (``proto.internal_auth``).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc

from proto.internal_auth import TokenCheck
from proto.names import id_problem, session_key_problem
from proto.tiers import Tier
from proto import node_agent_pb2 as pb
from proto import node_agent_pb2_grpc as pb_grpc
from proto import tiers_pb2
from workers.node_agent import MoveKind, NodeAgent, Refused
from workers.shared_tier import TierError

log = logging.getLogger(__name__)

KNOWN_TIERS = frozenset(t.pb for t in Tier)
KIND_FROM_PB = {pb.MOVE_KIND_DEMOTE: MoveKind.DEMOTE, pb.MOVE_KIND_PROMOTE: MoveKind.PROMOTE,
                pb.MOVE_KIND_DROP: MoveKind.DROP}
STATE_TO_PB = {"committed": pb.MOVE_STATE_COMMITTED, "aborted": pb.MOVE_STATE_ABORTED,
               "unknown": pb.MOVE_STATE_UNKNOWN}
MAX_LEASE_S = 600.0
# A session entry is at most ~420 bytes (ids of 128 characters): 8,192 of them stay below 4 MB.
MAX_CHUNK_SESSIONS, DEFAULT_CHUNK_SESSIONS = 8192, 2048
MAX_REPORT_BYTES = (4 << 20) - (64 << 10)  # gRPC's default receive limit, less room for framing


class NodeAgentServicer(pb_grpc.NodeAgentServiceServicer):
    def __init__(self, agent: NodeAgent, clock=time.monotonic, metrics: dict | None = None):
        self.agent, self.clock = agent, clock
        self.metrics = metrics or {}  # from proto.telemetry.metrics.make_metrics
        self._lock = threading.Lock()  # the agent is a plain class: one call at a time
        self._prepared_at: dict[str, float] = {}

    def sweep(self) -> list[str]:
        """Abort prepared moves whose lease ran out; returns their ids."""
        with self._lock:
            return self.agent.expire(self.clock())

    def ReportOccupancy(self, request, context):
        report = self._snapshot(request)
        if report.ByteSize() > MAX_REPORT_BYTES:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{len(report.sessions)} sessions make a {report.ByteSize()}-byte report, past gRPC's "
                          "message limit: ask StreamOccupancy")
        return report

    def StreamOccupancy(self, request, context):
        size = request.max_sessions_per_chunk or DEFAULT_CHUNK_SESSIONS
        if size > MAX_CHUNK_SESSIONS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"max_sessions_per_chunk must be at most {MAX_CHUNK_SESSIONS}, got {size}")
        report = self._snapshot(request)  # one snapshot, taken under the lock; sent without it
        sessions = list(report.sessions)
        del report.sessions[:]
        head = dict(node_id=report.node_id, agent_instance_id=report.agent_instance_id, report_seq=report.report_seq)
        report.sessions.extend(sessions[:size])
        yield report
        for start in range(size, len(sessions), size):
            yield pb.OccupancyReport(**head, sessions=sessions[start:start + size])

    def _snapshot(self, request) -> pb.OccupancyReport:
        with self._lock:
            self.agent.expire(self.clock())
            self.agent.report_seq += 1
            report = pb.OccupancyReport(node_id=self.agent.node_id, agent_instance_id=self.agent.instance_id,
                                        report_seq=self.agent.report_seq,
                                        prepared_move_ids=sorted(self.agent.moves))
            dram = self.agent.dram
            report.tiers.append(pb.TierOccupancy(
                where=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_DRAM, node_id=self.agent.node_id),
                capacity_bytes=dram.capacity_bytes, used_bytes=dram.used_bytes()))
            shared_sessions = self._shared_occupancy(report)
            self._gauge_tiers(report)
            if request.capacities_only:
                return report
            for place in self.agent.places():
                report.sessions.append(pb.SessionKv(
                    session_id=place.session_id,
                    location=tiers_pb2.KvLocation(tier=place.tier.pb, replica_id=place.replica_id,
                                                  node_id=self.agent.node_id),
                    kv_bytes=place.kv_bytes, kv_tokens=place.kv_tokens, pinned_by_move_id=place.pinned_by_move_id))
            # Every shared copy, a node-local one of the same session too: the controller's
            # reconciliation must see each tier's copies (the restore keeps the nearer one).
            for session_id, nbytes in shared_sessions.items():
                report.sessions.append(pb.SessionKv(
                    session_id=session_id, location=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_SHARED),
                    kv_bytes=nbytes))
            return report

    def _shared_occupancy(self, report) -> dict[str, int]:
        shared = self.agent.shared
        if shared is None:
            return {}
        try:
            sessions = shared.sessions()
            report.tiers.append(pb.TierOccupancy(where=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_SHARED),
                                                 capacity_bytes=shared.capacity_bytes, used_bytes=shared.used_bytes()))
            return sessions
        except TierError:
            return {}

    def PrepareMove(self, request, context):
        problem = _check_prepare(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        with self._lock:
            try:
                move = self.agent.prepare(
                    request.move_id, request.session_id, KIND_FROM_PB[request.kind],
                    Tier.from_pb(request.src.tier), Tier.from_pb(request.dst.tier),
                    request.src.replica_id or request.dst.replica_id, request.lease_s, self.clock())
            except Refused as r:
                return pb.PrepareMoveResponse(move_id=request.move_id, refused=pb.Refusal(
                    reason=pb.RefusalReason.Value(r.reason), message=str(r), available_bytes=r.available_bytes))
            self._prepared_at.setdefault(move.move_id, self.clock())
            return pb.PrepareMoveResponse(move_id=move.move_id, reserved=pb.Reservation(
                reserved_bytes=move.reserved_bytes, lease_s=max(0.0, move.deadline - self.clock())))

    def CompleteMove(self, request, context):
        if problem := id_problem("move_id", request.move_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        with self._lock:
            move = self.agent.moves.get(request.move_id)
            state, tier = self.agent.complete(request.move_id, self.clock())
            if move is not None and state in ("committed", "aborted"):
                self._count_move(move, failed=state == "aborted")
        return pb.CompleteMoveResponse(state=STATE_TO_PB[state],
                                       location=tiers_pb2.KvLocation(tier=tier.pb, node_id=self.agent.node_id))

    def AbortMove(self, request, context):
        if problem := id_problem("move_id", request.move_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        with self._lock:
            move = self.agent.moves.get(request.move_id)
            state = self.agent.abort(request.move_id, request.reason or "aborted by caller")
            if move is not None:
                self._count_move(move, failed=True)
        return pb.AbortMoveResponse(state=STATE_TO_PB[state])

    def _count_move(self, move, failed: bool) -> None:
        started = self._prepared_at.pop(move.move_id, None)
        if not self.metrics:
            return
        labels = dict(kind=move.kind.value, src_tier=move.src.name.lower(), dst_tier=move.dst.name.lower())
        if failed:
            self.metrics["lull:kv_move_failures"].labels(**labels).inc()
            return
        self.metrics["lull:kv_moves"].labels(**labels).inc()
        self.metrics["lull:kv_move_bytes"].labels(**labels).inc(move.reserved_bytes)
        if started is not None:
            self.metrics["lull:kv_move_duration_seconds"].labels(**labels).observe(self.clock() - started)

    def _gauge_tiers(self, report) -> None:
        if not self.metrics:
            return
        for tier in report.tiers:
            labels = dict(tier=tiers_pb2.Tier.Name(tier.where.tier).removeprefix("TIER_").lower(),
                          node=tier.where.node_id, replica=tier.where.replica_id)
            self.metrics["lull:tier_used_bytes"].labels(**labels).set(tier.used_bytes)
            self.metrics["lull:tier_capacity_bytes"].labels(**labels).set(tier.capacity_bytes)

    def Health(self, request, context):
        # Outside the lock (the shared tier is thread-safe): the controller probes every second,
        # and a stalled Redis must not hold up moves that never touch it.
        instance = self.agent.shared_instance()
        with self._lock:
            reachable = bool(instance)
            status = pb.HEALTH_STATUS_SERVING if reachable or self.agent.shared is None else pb.HEALTH_STATUS_DEGRADED
            return pb.HealthResponse(status=status, node_id=self.agent.node_id,
                                     agent_instance_id=self.agent.instance_id, shared_tier_reachable=reachable,
                                     prepared_moves=len(self.agent.moves), shared_tier_instance_id=instance)


def _check_prepare(request) -> str:
    if problem := _id_problems(request):
        return problem
    if request.kind not in KIND_FROM_PB:
        return f"kind must be DEMOTE, PROMOTE or DROP, got {request.kind}"
    if not {request.src.tier, request.dst.tier} <= KNOWN_TIERS:
        return "src.tier and dst.tier must be set"
    if request.src.tier == request.dst.tier:
        return "src and dst tiers must differ"
    if not 0 < request.lease_s <= MAX_LEASE_S:
        return f"lease_s must be in (0, {MAX_LEASE_S:g}], got {request.lease_s}"
    if request.kv_bytes > 1 << 50:
        return f"kv_bytes {request.kv_bytes} is not a plausible size"
    if request.src.tier == tiers_pb2.TIER_WAITING:
        return "nothing to move from TIER_WAITING: KV there was dropped"
    if request.kind == pb.MOVE_KIND_DROP and request.dst.tier != tiers_pb2.TIER_WAITING:
        return "a DROP must have dst TIER_WAITING"
    return ""


def _id_problems(request) -> str:
    problem = id_problem("move_id", request.move_id) or session_key_problem("session_id", request.session_id)
    for end in ("src", "dst"):
        replica = getattr(request, end).replica_id
        if problem or not replica:
            continue
        problem = id_problem(f"{end}.replica_id", replica)
        if not problem and replica in (".", ".."):
            problem = f"{end}.replica_id must not be . or ..; got {replica!r}"
    return problem


class _Undecodable:
    """A request whose bytes are not the method's message (gRPC would answer INTERNAL)."""


class RejectUndecodable(grpc.ServerInterceptor):
    """A request that does not parse as its message gets INVALID_ARGUMENT, not INTERNAL. Installed
    after ``TokenCheck``, whose refusal then parses tolerantly too: UNAUTHENTICATED comes first."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, handler_call_details.method.rpartition("/")[2]

        def tolerant(data: bytes):
            try:
                return parse(data)
            except Exception:  # DecodeError, or bytes that are not valid UTF-8 in a string field
                return _Undecodable()

        def checked(behavior):
            def call(request, context):
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {method} message")
                return behavior(request, context)
            return call

        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=tolerant, unary_unary=checked(handler.unary_unary))
        if handler.unary_stream is not None:
            return handler._replace(request_deserializer=tolerant, unary_stream=checked(handler.unary_stream))
        return handler


def serve(agent: NodeAgent, port: int = 0, host: str = "127.0.0.1", *, token: str,
          metrics: dict | None = None) -> tuple[grpc.Server, int, NodeAgentServicer]:
    """Start the agent's gRPC server on ``host`` (the node's own address, never every
    interface by default); every call must carry ``token``. Returns the server, the bound
    port (pick one with port=0) and the servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         interceptors=[TokenCheck(token), RejectUndecodable()])
    servicer = NodeAgentServicer(agent, metrics=metrics)
    pb_grpc.add_NodeAgentServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"node agent cannot bind {host}:{port}; is another agent running on this node?")
    server.start()
    log.info("node agent %s serving gRPC on port %d", agent.node_id, bound)
    return server, bound, servicer
