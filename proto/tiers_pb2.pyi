from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_GPU: _ClassVar[Tier]
    TIER_DRAM: _ClassVar[Tier]
    TIER_SHARED: _ClassVar[Tier]
    TIER_WAITING: _ClassVar[Tier]

class SessionPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[SessionPhase]
    PHASE_LLM: _ClassVar[SessionPhase]
    PHASE_TOOL: _ClassVar[SessionPhase]
    PHASE_GATED: _ClassVar[SessionPhase]
TIER_UNSPECIFIED: Tier
TIER_GPU: Tier
TIER_DRAM: Tier
TIER_SHARED: Tier
TIER_WAITING: Tier
PHASE_UNSPECIFIED: SessionPhase
PHASE_LLM: SessionPhase
PHASE_TOOL: SessionPhase
PHASE_GATED: SessionPhase

class KvLocation(_message.Message):
    __slots__ = ("tier", "replica_id", "node_id")
    TIER_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    replica_id: str
    node_id: str
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., replica_id: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...
