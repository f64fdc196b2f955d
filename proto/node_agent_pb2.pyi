from proto import tiers_pb2 as _tiers_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MoveKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MOVE_KIND_UNSPECIFIED: _ClassVar[MoveKind]
    MOVE_KIND_DEMOTE: _ClassVar[MoveKind]
    MOVE_KIND_PROMOTE: _ClassVar[MoveKind]
    MOVE_KIND_DROP: _ClassVar[MoveKind]

class RefusalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUSAL_REASON_UNSPECIFIED: _ClassVar[RefusalReason]
    REFUSAL_REASON_INSUFFICIENT_CAPACITY: _ClassVar[RefusalReason]
    REFUSAL_REASON_SOURCE_NOT_FOUND: _ClassVar[RefusalReason]
    REFUSAL_REASON_SOURCE_BUSY: _ClassVar[RefusalReason]
    REFUSAL_REASON_DESTINATION_UNAVAILABLE: _ClassVar[RefusalReason]
    REFUSAL_REASON_MOVE_FINISHED: _ClassVar[RefusalReason]

class MoveState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MOVE_STATE_UNSPECIFIED: _ClassVar[MoveState]
    MOVE_STATE_PREPARED: _ClassVar[MoveState]
    MOVE_STATE_COMMITTED: _ClassVar[MoveState]
    MOVE_STATE_ABORTED: _ClassVar[MoveState]
    MOVE_STATE_UNKNOWN: _ClassVar[MoveState]

class HealthStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_STATUS_UNSPECIFIED: _ClassVar[HealthStatus]
    HEALTH_STATUS_SERVING: _ClassVar[HealthStatus]
    HEALTH_STATUS_DEGRADED: _ClassVar[HealthStatus]
    HEALTH_STATUS_NOT_SERVING: _ClassVar[HealthStatus]
MOVE_KIND_UNSPECIFIED: MoveKind
MOVE_KIND_DEMOTE: MoveKind
MOVE_KIND_PROMOTE: MoveKind
MOVE_KIND_DROP: MoveKind
REFUSAL_REASON_UNSPECIFIED: RefusalReason
REFUSAL_REASON_INSUFFICIENT_CAPACITY: RefusalReason
REFUSAL_REASON_SOURCE_NOT_FOUND: RefusalReason
REFUSAL_REASON_SOURCE_BUSY: RefusalReason
REFUSAL_REASON_DESTINATION_UNAVAILABLE: RefusalReason
REFUSAL_REASON_MOVE_FINISHED: RefusalReason
MOVE_STATE_UNSPECIFIED: MoveState
MOVE_STATE_PREPARED: MoveState
MOVE_STATE_COMMITTED: MoveState
MOVE_STATE_ABORTED: MoveState
MOVE_STATE_UNKNOWN: MoveState
HEALTH_STATUS_UNSPECIFIED: HealthStatus
HEALTH_STATUS_SERVING: HealthStatus
HEALTH_STATUS_DEGRADED: HealthStatus
HEALTH_STATUS_NOT_SERVING: HealthStatus

class ReportOccupancyRequest(_message.Message):
    __slots__ = ("capacities_only", "max_sessions_per_chunk")
    CAPACITIES_ONLY_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_CHUNK_FIELD_NUMBER: _ClassVar[int]
    capacities_only: bool
    max_sessions_per_chunk: int
    def __init__(self, capacities_only: bool = ..., max_sessions_per_chunk: _Optional[int] = ...) -> None: ...

class TierOccupancy(_message.Message):
    __slots__ = ("where", "capacity_bytes", "used_bytes", "reserved_bytes")
    WHERE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    where: _tiers_pb2.KvLocation
    capacity_bytes: int
    used_bytes: int
    reserved_bytes: int
    def __init__(self, where: _Optional[_Union[_tiers_pb2.KvLocation, _Mapping]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., reserved_bytes: _Optional[int] = ...) -> None: ...

class SessionKv(_message.Message):
    __slots__ = ("session_id", "location", "kv_bytes", "kv_tokens", "pinned_by_move_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BY_MOVE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    location: _tiers_pb2.KvLocation
    kv_bytes: int
    kv_tokens: int
    pinned_by_move_id: str
    def __init__(self, session_id: _Optional[str] = ..., location: _Optional[_Union[_tiers_pb2.KvLocation, _Mapping]] = ..., kv_bytes: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., pinned_by_move_id: _Optional[str] = ...) -> None: ...

class OccupancyReport(_message.Message):
    __slots__ = ("node_id", "agent_instance_id", "report_seq", "tiers", "sessions", "prepared_move_ids")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_SEQ_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PREPARED_MOVE_IDS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    agent_instance_id: str
    report_seq: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierOccupancy]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionKv]
    prepared_move_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., agent_instance_id: _Optional[str] = ..., report_seq: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierOccupancy, _Mapping]]] = ..., sessions: _Optional[_Iterable[_Union[SessionKv, _Mapping]]] = ..., prepared_move_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PrepareMoveRequest(_message.Message):
    __slots__ = ("move_id", "session_id", "kind", "src", "dst", "kv_bytes", "lease_s")
    MOVE_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SRC_FIELD_NUMBER: _ClassVar[int]
    DST_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    move_id: str
    session_id: str
    kind: MoveKind
    src: _tiers_pb2.KvLocation
    dst: _tiers_pb2.KvLocation
    kv_bytes: int
    lease_s: float
    def __init__(self, move_id: _Optional[str] = ..., session_id: _Optional[str] = ..., kind: _Optional[_Union[MoveKind, str]] = ..., src: _Optional[_Union[_tiers_pb2.KvLocation, _Mapping]] = ..., dst: _Optional[_Union[_tiers_pb2.KvLocation, _Mapping]] = ..., kv_bytes: _Optional[int] = ..., lease_s: _Optional[float] = ...) -> None: ...

class Reservation(_message.Message):
    __slots__ = ("reserved_bytes", "lease_s")
    RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    reserved_bytes: int
    lease_s: float
    def __init__(self, reserved_bytes: _Optional[int] = ..., lease_s: _Optional[float] = ...) -> None: ...

class Refusal(_message.Message):
    __slots__ = ("reason", "message", "available_bytes")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    reason: RefusalReason
    message: str
    available_bytes: int
    def __init__(self, reason: _Optional[_Union[RefusalReason, str]] = ..., message: _Optional[str] = ..., available_bytes: _Optional[int] = ...) -> None: ...

class PrepareMoveResponse(_message.Message):
    __slots__ = ("move_id", "reserved", "refused")
    MOVE_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    move_id: str
    reserved: Reservation
    refused: Refusal
    def __init__(self, move_id: _Optional[str] = ..., reserved: _Optional[_Union[Reservation, _Mapping]] = ..., refused: _Optional[_Union[Refusal, _Mapping]] = ...) -> None: ...

class CompleteMoveRequest(_message.Message):
    __slots__ = ("move_id",)
    MOVE_ID_FIELD_NUMBER: _ClassVar[int]
    move_id: str
    def __init__(self, move_id: _Optional[str] = ...) -> None: ...

class CompleteMoveResponse(_message.Message):
    __slots__ = ("state", "location", "message")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    state: MoveState
    location: _tiers_pb2.KvLocation
    message: str
    def __init__(self, state: _Optional[_Union[MoveState, str]] = ..., location: _Optional[_Union[_tiers_pb2.KvLocation, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class AbortMoveRequest(_message.Message):
    __slots__ = ("move_id", "reason")
    MOVE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    move_id: str
    reason: str
    def __init__(self, move_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortMoveResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: MoveState
    def __init__(self, state: _Optional[_Union[MoveState, str]] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "node_id", "agent_instance_id", "shared_tier_reachable", "prepared_moves", "shared_tier_instance_id")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_TIER_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    PREPARED_MOVES_FIELD_NUMBER: _ClassVar[int]
    SHARED_TIER_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    status: HealthStatus
    node_id: str
    agent_instance_id: str
    shared_tier_reachable: bool
    prepared_moves: int
    shared_tier_instance_id: str
    def __init__(self, status: _Optional[_Union[HealthStatus, str]] = ..., node_id: _Optional[str] = ..., agent_instance_id: _Optional[str] = ..., shared_tier_reachable: bool = ..., prepared_moves: _Optional[int] = ..., shared_tier_instance_id: _Optional[str] = ...) -> None: ...
