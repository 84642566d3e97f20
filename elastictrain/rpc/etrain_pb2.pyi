from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("rank", "local_rank", "pid", "state", "exited", "exit_code", "step", "speed", "share")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    local_rank: int
    pid: int
    state: str
    exited: bool
    exit_code: int
    step: int
    speed: float
    share: float
    def __init__(self, rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., exited: _Optional[bool] = ..., exit_code: _Optional[int] = ..., step: _Optional[int] = ..., speed: _Optional[float] = ..., share: _Optional[float] = ...) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("job_id", "node_id", "hostname", "endpoint", "state", "restart_count", "max_restarts", "round", "group_rank", "group_world_size", "world_size", "gpus", "workers", "pid", "disk_error", "etcd_silent_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    GROUP_WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DISK_ERROR_FIELD_NUMBER: _ClassVar[int]
    ETCD_SILENT_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    node_id: str
    hostname: str
    endpoint: str
    state: str
    restart_count: int
    max_restarts: int
    round: int
    group_rank: int
    group_world_size: int
    world_size: int
    gpus: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    pid: int
    disk_error: str
    etcd_silent_ms: int
    def __init__(self, job_id: _Optional[str] = ..., node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., endpoint: _Optional[str] = ..., state: _Optional[str] = ..., restart_count: _Optional[int] = ..., max_restarts: _Optional[int] = ..., round: _Optional[int] = ..., group_rank: _Optional[int] = ..., group_world_size: _Optional[int] = ..., world_size: _Optional[int] = ..., gpus: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., pid: _Optional[int] = ..., disk_error: _Optional[str] = ..., etcd_silent_ms: _Optional[int] = ...) -> None: ...

class InjectFaultRequest(_message.Message):
    __slots__ = ("rank", "kind", "signal", "factor", "seconds", "max_bytes")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KILL: _ClassVar[InjectFaultRequest.Kind]
        SLOW: _ClassVar[InjectFaultRequest.Kind]
        HANG: _ClassVar[InjectFaultRequest.Kind]
        KILL_AGENT: _ClassVar[InjectFaultRequest.Kind]
        PARTITION: _ClassVar[InjectFaultRequest.Kind]
        ETCD_RESTART: _ClassVar[InjectFaultRequest.Kind]
        CORRUPT_CHUNK: _ClassVar[InjectFaultRequest.Kind]
        DISK_FULL: _ClassVar[InjectFaultRequest.Kind]
    KILL: InjectFaultRequest.Kind
    SLOW: InjectFaultRequest.Kind
    HANG: InjectFaultRequest.Kind
    KILL_AGENT: InjectFaultRequest.Kind
    PARTITION: InjectFaultRequest.Kind
    ETCD_RESTART: InjectFaultRequest.Kind
    CORRUPT_CHUNK: InjectFaultRequest.Kind
    DISK_FULL: InjectFaultRequest.Kind
    RANK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    kind: InjectFaultRequest.Kind
    signal: int
    factor: float
    seconds: float
    max_bytes: int
    def __init__(self, rank: _Optional[int] = ..., kind: _Optional[_Union[InjectFaultRequest.Kind, str]] = ..., signal: _Optional[int] = ..., factor: _Optional[float] = ..., seconds: _Optional[float] = ..., max_bytes: _Optional[int] = ...) -> None: ...

class InjectFaultResponse(_message.Message):
    __slots__ = ("ok", "message", "pid", "node_id")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    pid: int
    node_id: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ..., pid: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class GetSnapshotIndexRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SnapshotRecordInfo(_message.Message):
    __slots__ = ("rank", "step", "nbytes", "meta", "checksum", "segment")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    step: int
    nbytes: int
    meta: bytes
    checksum: int
    segment: str
    def __init__(self, rank: _Optional[int] = ..., step: _Optional[int] = ..., nbytes: _Optional[int] = ..., meta: _Optional[bytes] = ..., checksum: _Optional[int] = ..., segment: _Optional[str] = ...) -> None: ...

class SnapshotIndex(_message.Message):
    __slots__ = ("node_id", "committed_step", "records", "agents", "memory_bytes", "chunks", "committed_nodes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_NODES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    committed_step: int
    records: _containers.RepeatedCompositeFieldContainer[SnapshotRecordInfo]
    agents: _containers.RepeatedScalarFieldContainer[str]
    memory_bytes: int
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkHeader]
    committed_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., committed_step: _Optional[int] = ..., records: _Optional[_Iterable[_Union[SnapshotRecordInfo, _Mapping]]] = ..., agents: _Optional[_Iterable[str]] = ..., memory_bytes: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[ChunkHeader, _Mapping]]] = ..., committed_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("owner", "step", "index", "k", "m", "redundancy", "payload_bytes", "chunk_bytes", "checksums")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    M_FIELD_NUMBER: _ClassVar[int]
    REDUNDANCY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    owner: str
    step: int
    index: int
    k: int
    m: int
    redundancy: str
    payload_bytes: int
    chunk_bytes: int
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, owner: _Optional[str] = ..., step: _Optional[int] = ..., index: _Optional[int] = ..., k: _Optional[int] = ..., m: _Optional[int] = ..., redundancy: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class ChunkPiece(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ChunkHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ChunkHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutChunkResponse(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class GetChunkRequest(_message.Message):
    __slots__ = ("owner", "step", "index")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    owner: str
    step: int
    index: int
    def __init__(self, owner: _Optional[str] = ..., step: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...

class RecoverSnapshotRequest(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class RecoverSnapshotResponse(_message.Message):
    __slots__ = ("recovered_owners", "ranks", "message")
    RECOVERED_OWNERS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    recovered_owners: _containers.RepeatedScalarFieldContainer[str]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    message: str
    def __init__(self, recovered_owners: _Optional[_Iterable[str]] = ..., ranks: _Optional[_Iterable[int]] = ..., message: _Optional[str] = ...) -> None: ...

class ReadSnapshotRequest(_message.Message):
    __slots__ = ("rank", "step", "offset", "length")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    rank: int
    step: int
    offset: int
    length: int
    def __init__(self, rank: _Optional[int] = ..., step: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class SaveSnapshotRequest(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class SaveSnapshotResponse(_message.Message):
    __slots__ = ("ok", "step", "path", "raw_bytes", "compressed_bytes", "seconds", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    RAW_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    step: int
    path: str
    raw_bytes: int
    compressed_bytes: int
    seconds: float
    message: str
    def __init__(self, ok: _Optional[bool] = ..., step: _Optional[int] = ..., path: _Optional[str] = ..., raw_bytes: _Optional[int] = ..., compressed_bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., message: _Optional[str] = ...) -> None: ...
