from proto import tiers_pb2 as _tiers_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason

class OpenSessionRequest(_message.Message):
    __slots__ = ("tenant", "metadata", "session_id")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    metadata: _containers.ScalarMap[str, str]
    session_id: str
    def __init__(self, tenant: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., session_id: _Optional[str] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "created")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    created: bool
    def __init__(self, session_id: _Optional[str] = ..., created: bool = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "seed", "stop")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "text", "token_ids", "sampling")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    token_ids: TokenIds
    sampling: SamplingParams
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens", "kv_tier_at_arrival", "gate_wait_s")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TIER_AT_ARRIVAL_FIELD_NUMBER: _ClassVar[int]
    GATE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    kv_tier_at_arrival: _tiers_pb2.Tier
    gate_wait_s: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., kv_tier_at_arrival: _Optional[_Union[_tiers_pb2.Tier, str]] = ..., gate_wait_s: _Optional[float] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: Usage
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ToolCallStartedRequest(_message.Message):
    __slots__ = ("session_id", "tool_name", "client_time_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIME_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tool_name: str
    client_time_s: float
    def __init__(self, session_id: _Optional[str] = ..., tool_name: _Optional[str] = ..., client_time_s: _Optional[float] = ...) -> None: ...

class ToolCallStartedResponse(_message.Message):
    __slots__ = ("applied", "phase")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    phase: _tiers_pb2.SessionPhase
    def __init__(self, applied: bool = ..., phase: _Optional[_Union[_tiers_pb2.SessionPhase, str]] = ...) -> None: ...

class ToolCallFinishedRequest(_message.Message):
    __slots__ = ("session_id", "tool_name", "client_time_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIME_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tool_name: str
    client_time_s: float
    def __init__(self, session_id: _Optional[str] = ..., tool_name: _Optional[str] = ..., client_time_s: _Optional[float] = ...) -> None: ...

class ToolCallFinishedResponse(_message.Message):
    __slots__ = ("applied", "phase")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    phase: _tiers_pb2.SessionPhase
    def __init__(self, applied: bool = ..., phase: _Optional[_Union[_tiers_pb2.SessionPhase, str]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("was_open",)
    WAS_OPEN_FIELD_NUMBER: _ClassVar[int]
    was_open: bool
    def __init__(self, was_open: bool = ...) -> None: ...

class GetSessionStateRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionState(_message.Message):
    __slots__ = ("session_id", "tenant", "location", "phase", "idleness", "idleness_cycles", "idleness_rank", "kv_tokens", "gate_wait_s", "total_gate_wait_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    IDLENESS_FIELD_NUMBER: _ClassVar[int]
    IDLENESS_CYCLES_FIELD_NUMBER: _ClassVar[int]
    IDLENESS_RANK_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GATE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_GATE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tenant: str
    location: _tiers_pb2.KvLocation
    phase: _tiers_pb2.SessionPhase
    idleness: float
    idleness_cycles: int
    idleness_rank: int
    kv_tokens: int
    gate_wait_s: float
    total_gate_wait_s: float
    def __init__(self, session_id: _Optional[str] = ..., tenant: _Optional[str] = ..., location: _Optional[_Union[_tiers_pb2.KvLocation, _Mapping]] = ..., phase: _Optional[_Union[_tiers_pb2.SessionPhase, str]] = ..., idleness: _Optional[float] = ..., idleness_cycles: _Optional[int] = ..., idleness_rank: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., gate_wait_s: _Optional[float] = ..., total_gate_wait_s: _Optional[float] = ...) -> None: ...
