import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Visibility(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VISIBILITY_UNSPECIFIED: _ClassVar[Visibility]
    VISIBILITY_PRIVATE: _ClassVar[Visibility]
    VISIBILITY_SHARED: _ClassVar[Visibility]
    VISIBILITY_PUBLIC: _ClassVar[Visibility]

class RunKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_KIND_UNSPECIFIED: _ClassVar[RunKind]
    RUN_KIND_QUESTIONS: _ClassVar[RunKind]
    RUN_KIND_CAPTURE: _ClassVar[RunKind]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_DONE: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
VISIBILITY_UNSPECIFIED: Visibility
VISIBILITY_PRIVATE: Visibility
VISIBILITY_SHARED: Visibility
VISIBILITY_PUBLIC: Visibility
RUN_KIND_UNSPECIFIED: RunKind
RUN_KIND_QUESTIONS: RunKind
RUN_KIND_CAPTURE: RunKind
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_DONE: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_FAILED: JobState

class RunRef(_message.Message):
    __slots__ = ("model", "method")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    model: str
    method: str
    def __init__(self, model: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class Access(_message.Message):
    __slots__ = ("owner_group", "visibility", "shared_with")
    OWNER_GROUP_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    SHARED_WITH_FIELD_NUMBER: _ClassVar[int]
    owner_group: str
    visibility: Visibility
    shared_with: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, owner_group: _Optional[str] = ..., visibility: _Optional[_Union[Visibility, str]] = ..., shared_with: _Optional[_Iterable[str]] = ...) -> None: ...

class SiteInfo(_message.Message):
    __slots__ = ("name", "n_layers", "width", "dims")
    NAME_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    n_layers: int
    width: int
    dims: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., n_layers: _Optional[int] = ..., width: _Optional[int] = ..., dims: _Optional[_Iterable[str]] = ...) -> None: ...

class RunSummary(_message.Message):
    __slots__ = ("run", "n_layers", "n_samples", "hidden", "accuracy", "complete", "access", "kind", "sites", "row_dim", "n_texts", "store_dtype")
    RUN_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    ACCESS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    ROW_DIM_FIELD_NUMBER: _ClassVar[int]
    N_TEXTS_FIELD_NUMBER: _ClassVar[int]
    STORE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    n_layers: int
    n_samples: int
    hidden: int
    accuracy: float
    complete: bool
    access: Access
    kind: RunKind
    sites: _containers.RepeatedCompositeFieldContainer[SiteInfo]
    row_dim: str
    n_texts: int
    store_dtype: str
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., n_layers: _Optional[int] = ..., n_samples: _Optional[int] = ..., hidden: _Optional[int] = ..., accuracy: _Optional[float] = ..., complete: _Optional[bool] = ..., access: _Optional[_Union[Access, _Mapping]] = ..., kind: _Optional[_Union[RunKind, str]] = ..., sites: _Optional[_Iterable[_Union[SiteInfo, _Mapping]]] = ..., row_dim: _Optional[str] = ..., n_texts: _Optional[int] = ..., store_dtype: _Optional[str] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "model", "method")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    model: str
    method: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSummary]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DescribeRunRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ...) -> None: ...

class LabelValues(_message.Message):
    __slots__ = ("name", "values", "truncated")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[str]
    truncated: bool
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("summary", "dtype", "layers", "labels", "size_bytes", "recipe_json", "attributes_json")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECIPE_JSON_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_JSON_FIELD_NUMBER: _ClassVar[int]
    summary: RunSummary
    dtype: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedCompositeFieldContainer[LabelValues]
    size_bytes: int
    recipe_json: str
    attributes_json: str
    def __init__(self, summary: _Optional[_Union[RunSummary, _Mapping]] = ..., dtype: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[_Union[LabelValues, _Mapping]]] = ..., size_bytes: _Optional[int] = ..., recipe_json: _Optional[str] = ..., attributes_json: _Optional[str] = ...) -> None: ...

class SetVisibilityRequest(_message.Message):
    __slots__ = ("run", "visibility", "shared_with")
    RUN_FIELD_NUMBER: _ClassVar[int]
    VISIBILITY_FIELD_NUMBER: _ClassVar[int]
    SHARED_WITH_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    visibility: Visibility
    shared_with: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., visibility: _Optional[_Union[Visibility, str]] = ..., shared_with: _Optional[_Iterable[str]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class SampleSelection(_message.Message):
    __slots__ = ("ids", "positions", "filters", "token_positions", "token_range", "rows")
    IDS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_RANGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    positions: Range
    filters: _containers.RepeatedCompositeFieldContainer[LabelFilter]
    token_positions: _containers.RepeatedScalarFieldContainer[int]
    token_range: Range
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., positions: _Optional[_Union[Range, _Mapping]] = ..., filters: _Optional[_Iterable[_Union[LabelFilter, _Mapping]]] = ..., token_positions: _Optional[_Iterable[int]] = ..., token_range: _Optional[_Union[Range, _Mapping]] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...

class LabelFilter(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadStatesRequest(_message.Message):
    __slots__ = ("run", "layers", "layer_range", "samples", "hidden_range", "dtype", "allow_lossy", "accept_blosc", "site", "accept_blosc_float16")
    RUN_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LAYER_RANGE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_RANGE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_LOSSY_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_BLOSC_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_BLOSC_FLOAT16_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    layers: _containers.RepeatedScalarFieldContainer[int]
    layer_range: Range
    samples: SampleSelection
    hidden_range: Range
    dtype: DType
    allow_lossy: bool
    accept_blosc: bool
    site: str
    accept_blosc_float16: bool
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., layers: _Optional[_Iterable[int]] = ..., layer_range: _Optional[_Union[Range, _Mapping]] = ..., samples: _Optional[_Union[SampleSelection, _Mapping]] = ..., hidden_range: _Optional[_Union[Range, _Mapping]] = ..., dtype: _Optional[_Union[DType, str]] = ..., allow_lossy: _Optional[bool] = ..., accept_blosc: _Optional[bool] = ..., site: _Optional[str] = ..., accept_blosc_float16: _Optional[bool] = ...) -> None: ...

class StatesHeader(_message.Message):
    __slots__ = ("shape", "dtype", "dims", "layers", "labels", "hidden_start", "run_complete", "columns", "site")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_START_FIELD_NUMBER: _ClassVar[int]
    RUN_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    dims: _containers.RepeatedScalarFieldContainer[str]
    layers: _containers.RepeatedScalarFieldContainer[int]
    labels: Labels
    hidden_start: int
    run_complete: bool
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    site: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., dims: _Optional[_Iterable[str]] = ..., layers: _Optional[_Iterable[int]] = ..., labels: _Optional[_Union[Labels, _Mapping]] = ..., hidden_start: _Optional[int] = ..., run_complete: _Optional[bool] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., site: _Optional[str] = ...) -> None: ...

class Column(_message.Message):
    __slots__ = ("name", "dtype", "int64_values", "float64_values", "bool_values", "str_values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INT64_VALUES_FIELD_NUMBER: _ClassVar[int]
    FLOAT64_VALUES_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUES_FIELD_NUMBER: _ClassVar[int]
    STR_VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    int64_values: _containers.RepeatedScalarFieldContainer[int]
    float64_values: _containers.RepeatedScalarFieldContainer[float]
    bool_values: _containers.RepeatedScalarFieldContainer[bool]
    str_values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., int64_values: _Optional[_Iterable[int]] = ..., float64_values: _Optional[_Iterable[float]] = ..., bool_values: _Optional[_Iterable[bool]] = ..., str_values: _Optional[_Iterable[str]] = ...) -> None: ...

class Labels(_message.Message):
    __slots__ = ("sample", "subject", "answer", "prediction", "correct")
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    sample: _containers.RepeatedScalarFieldContainer[int]
    subject: _containers.RepeatedScalarFieldContainer[str]
    answer: _containers.RepeatedScalarFieldContainer[str]
    prediction: _containers.RepeatedScalarFieldContainer[str]
    correct: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, sample: _Optional[_Iterable[int]] = ..., subject: _Optional[_Iterable[str]] = ..., answer: _Optional[_Iterable[str]] = ..., prediction: _Optional[_Iterable[str]] = ..., correct: _Optional[_Iterable[bool]] = ...) -> None: ...

class StatesChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ReadStatesResponse(_message.Message):
    __slots__ = ("header", "chunk", "blocks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    header: StatesHeader
    chunk: StatesChunk
    blocks: _containers.RepeatedCompositeFieldContainer[EncodedBlock]
    def __init__(self, header: _Optional[_Union[StatesHeader, _Mapping]] = ..., chunk: _Optional[_Union[StatesChunk, _Mapping]] = ..., blocks: _Optional[_Iterable[_Union[EncodedBlock, _Mapping]]] = ...) -> None: ...

class EncodedBlock(_message.Message):
    __slots__ = ("layer_index", "sample_start", "n_samples", "blosc", "chunk_bytes")
    LAYER_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_START_FIELD_NUMBER: _ClassVar[int]
    N_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    BLOSC_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    layer_index: int
    sample_start: int
    n_samples: int
    blosc: bytes
    chunk_bytes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer_index: _Optional[int] = ..., sample_start: _Optional[int] = ..., n_samples: _Optional[int] = ..., blosc: _Optional[bytes] = ..., chunk_bytes: _Optional[_Iterable[int]] = ...) -> None: ...

class ReadLabelsRequest(_message.Message):
    __slots__ = ("run", "samples")
    RUN_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    samples: SampleSelection
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., samples: _Optional[_Union[SampleSelection, _Mapping]] = ...) -> None: ...

class ReadLabelsResponse(_message.Message):
    __slots__ = ("labels", "run_complete", "columns", "row_dim")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    RUN_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROW_DIM_FIELD_NUMBER: _ClassVar[int]
    labels: Labels
    run_complete: bool
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    row_dim: str
    def __init__(self, labels: _Optional[_Union[Labels, _Mapping]] = ..., run_complete: _Optional[bool] = ..., columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., row_dim: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class AnalysisParams(_message.Message):
    __slots__ = ("maxk", "gride_range_max", "id_scale_index", "density_k", "z", "subject_fraction", "answer_fraction")
    MAXK_FIELD_NUMBER: _ClassVar[int]
    GRIDE_RANGE_MAX_FIELD_NUMBER: _ClassVar[int]
    ID_SCALE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DENSITY_K_FIELD_NUMBER: _ClassVar[int]
    Z_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FRACTION_FIELD_NUMBER: _ClassVar[int]
    maxk: int
    gride_range_max: int
    id_scale_index: int
    density_k: int
    z: float
    subject_fraction: float
    answer_fraction: float
    def __init__(self, maxk: _Optional[int] = ..., gride_range_max: _Optional[int] = ..., id_scale_index: _Optional[int] = ..., density_k: _Optional[int] = ..., z: _Optional[float] = ..., subject_fraction: _Optional[float] = ..., answer_fraction: _Optional[float] = ...) -> None: ...

class StartAnalysisRequest(_message.Message):
    __slots__ = ("runs", "layers", "preset", "params", "per_subject", "request_id", "compare", "compare_k", "site", "reduction", "label")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PER_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COMPARE_FIELD_NUMBER: _ClassVar[int]
    COMPARE_K_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunRef]
    layers: _containers.RepeatedScalarFieldContainer[int]
    preset: str
    params: AnalysisParams
    per_subject: int
    request_id: str
    compare: _containers.RepeatedCompositeFieldContainer[RunPair]
    compare_k: int
    site: str
    reduction: str
    label: str
    def __init__(self, runs: _Optional[_Iterable[_Union[RunRef, _Mapping]]] = ..., layers: _Optional[_Iterable[int]] = ..., preset: _Optional[str] = ..., params: _Optional[_Union[AnalysisParams, _Mapping]] = ..., per_subject: _Optional[int] = ..., request_id: _Optional[str] = ..., compare: _Optional[_Iterable[_Union[RunPair, _Mapping]]] = ..., compare_k: _Optional[int] = ..., site: _Optional[str] = ..., reduction: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class AnalysisSettings(_message.Message):
    __slots__ = ("params", "compare_k", "per_subject", "smallest_run_samples")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    COMPARE_K_FIELD_NUMBER: _ClassVar[int]
    PER_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SMALLEST_RUN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    params: AnalysisParams
    compare_k: int
    per_subject: int
    smallest_run_samples: int
    def __init__(self, params: _Optional[_Union[AnalysisParams, _Mapping]] = ..., compare_k: _Optional[int] = ..., per_subject: _Optional[int] = ..., smallest_run_samples: _Optional[int] = ...) -> None: ...

class RunPair(_message.Message):
    __slots__ = ("a", "b")
    A_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    a: RunRef
    b: RunRef
    def __init__(self, a: _Optional[_Union[RunRef, _Mapping]] = ..., b: _Optional[_Union[RunRef, _Mapping]] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class LayerResult(_message.Message):
    __slots__ = ("run", "layer", "error", "id", "ids_gride", "id_2nn", "n_clusters", "core_fraction", "ari_subject", "ari_answer", "overlap_subject", "overlap_answer", "sample_ids", "assignment", "dendrogram", "ari_prediction")
    RUN_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    IDS_GRIDE_FIELD_NUMBER: _ClassVar[int]
    ID_2NN_FIELD_NUMBER: _ClassVar[int]
    N_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    CORE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ARI_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ARI_ANSWER_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_ANSWER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    DENDROGRAM_FIELD_NUMBER: _ClassVar[int]
    ARI_PREDICTION_FIELD_NUMBER: _ClassVar[int]
    run: RunRef
    layer: int
    error: str
    id: float
    ids_gride: _containers.RepeatedScalarFieldContainer[float]
    id_2nn: float
    n_clusters: int
    core_fraction: float
    ari_subject: float
    ari_answer: float
    overlap_subject: float
    overlap_answer: float
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    assignment: _containers.RepeatedScalarFieldContainer[int]
    dendrogram: Dendrogram
    ari_prediction: float
    def __init__(self, run: _Optional[_Union[RunRef, _Mapping]] = ..., layer: _Optional[int] = ..., error: _Optional[str] = ..., id: _Optional[float] = ..., ids_gride: _Optional[_Iterable[float]] = ..., id_2nn: _Optional[float] = ..., n_clusters: _Optional[int] = ..., core_fraction: _Optional[float] = ..., ari_subject: _Optional[float] = ..., ari_answer: _Optional[float] = ..., overlap_subject: _Optional[float] = ..., overlap_answer: _Optional[float] = ..., sample_ids: _Optional[_Iterable[int]] = ..., assignment: _Optional[_Iterable[int]] = ..., dendrogram: _Optional[_Union[Dendrogram, _Mapping]] = ..., ari_prediction: _Optional[float] = ...) -> None: ...

class Dendrogram(_message.Message):
    __slots__ = ("clusters", "sizes", "labels", "linkage", "majority_share")
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LINKAGE_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SHARE_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedScalarFieldContainer[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    labels: _containers.RepeatedScalarFieldContainer[str]
    linkage: _containers.RepeatedScalarFieldContainer[float]
    majority_share: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, clusters: _Optional[_Iterable[int]] = ..., sizes: _Optional[_Iterable[int]] = ..., labels: _Optional[_Iterable[str]] = ..., linkage: _Optional[_Iterable[float]] = ..., majority_share: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerComparison(_message.Message):
    __slots__ = ("runs", "layer", "error", "n_common", "data_overlap", "ari_clusters")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    N_COMMON_FIELD_NUMBER: _ClassVar[int]
    DATA_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    ARI_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    runs: RunPair
    layer: int
    error: str
    n_common: int
    data_overlap: float
    ari_clusters: float
    def __init__(self, runs: _Optional[_Union[RunPair, _Mapping]] = ..., layer: _Optional[int] = ..., error: _Optional[str] = ..., n_common: _Optional[int] = ..., data_overlap: _Optional[float] = ..., ari_clusters: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "state", "stage", "tasks_done", "tasks_total", "results", "comparisons", "failure_code", "settings", "runs", "compare", "created")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TASKS_DONE_FIELD_NUMBER: _ClassVar[int]
    TASKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CODE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    COMPARE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    stage: str
    tasks_done: int
    tasks_total: int
    results: _containers.RepeatedCompositeFieldContainer[LayerResult]
    comparisons: _containers.RepeatedCompositeFieldContainer[LayerComparison]
    failure_code: int
    settings: AnalysisSettings
    runs: _containers.RepeatedCompositeFieldContainer[RunRef]
    compare: _containers.RepeatedCompositeFieldContainer[RunPair]
    created: _timestamp_pb2.Timestamp
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., stage: _Optional[str] = ..., tasks_done: _Optional[int] = ..., tasks_total: _Optional[int] = ..., results: _Optional[_Iterable[_Union[LayerResult, _Mapping]]] = ..., comparisons: _Optional[_Iterable[_Union[LayerComparison, _Mapping]]] = ..., failure_code: _Optional[int] = ..., settings: _Optional[_Union[AnalysisSettings, _Mapping]] = ..., runs: _Optional[_Iterable[_Union[RunRef, _Mapping]]] = ..., compare: _Optional[_Iterable[_Union[RunPair, _Mapping]]] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
