"""The Milvus contract: collection and alias names, schemas, index and search parameters.

Queries always go through the aliases; a new model version fills a new collection
`<prefix>cofeat_projects_v<model>` and the alias moves to it in one `alter_alias`, so a
query never sees a half-filled collection or a mix of model versions.
"""

from __future__ import annotations

from pymilvus import DataType, MilvusClient

from shared.settings import Settings

PROJECTS = "cofeat_projects"
USERS = "cofeat_users"
# New projects' warm-up vectors (services/embedder/warmup.py): an overlay on PROJECTS for
# "projects for a user" only, same schema; a project without a row here has none to add.
WARM = "cofeat_projects_warm"
METRIC = "COSINE"  # projects and users: image and taste are directions
# Warm rows keep their length (shared/warmup.served): how much behaviour vouches for a
# project. Until 2026-12-04 they were unit rows in `..._warm_v<model>`, ranked by cosine;
# the embedder replaces such a collection by `..._warm_v<model>_<WARM_LAYOUT>` at start.
WARM_METRIC = "IP"
WARM_LAYOUT = 1
VECTOR_FIELD = "embedding"
STATE_VERSION = "state_version"
PROJECT_KEY = "project_id"


def alias(settings: Settings, kind: str) -> str:
    return settings.milvus_prefix + kind


def collection_name(settings: Settings, kind: str, model_version: int, rebuild: int = 0) -> str:
    """`<prefix><kind>_v<model>`; a rebuild of the same model (a collection of an older
    schema) is `..._v<model>_<rebuild>`, since an aliased collection is never dropped."""
    suffix = f"_{rebuild}" if rebuild else ""
    return f"{settings.milvus_prefix}{kind}_v{model_version}{suffix}"


def connect(settings: Settings, **kwargs) -> MilvusClient:
    """`kwargs` go to MilvusClient (e.g. dedicated=True: a channel of its own, not one
    shared per address that may still be in gRPC's reconnect backoff after an outage)."""
    token = settings.milvus_token.get_secret_value() if settings.milvus_token else ""
    return MilvusClient(uri=settings.require_milvus_uri(), token=token,
                        timeout=settings.milvus_timeout_s, **kwargs)


def project_schema(dim: int):
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("project_id", DataType.INT64, is_primary=True)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("model_version", DataType.INT64)
    schema.add_field("owner_id", DataType.INT64)
    schema.add_field("published_at", DataType.INT64, description="epoch ms")
    # The Postgres projects.state_version this row was embedded from: drift is exact.
    schema.add_field(STATE_VERSION, DataType.INT64)
    return schema


def user_schema(dim: int):
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("user_id", DataType.INT64, is_primary=True)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("model_version", DataType.INT64)
    return schema


def index_params(settings: Settings, metric: str = METRIC):
    params = MilvusClient.prepare_index_params()
    params.add_index(field_name=VECTOR_FIELD, index_type="HNSW", metric_type=metric,
                     params={"M": settings.milvus_hnsw_m,
                             "efConstruction": settings.milvus_hnsw_ef_construction})
    return params


def search_params(settings: Settings) -> dict:
    return {"metric_type": METRIC, "params": {"ef": settings.milvus_search_ef}}


def drop_prefixed(client: MilvusClient, prefix: str) -> None:
    """Drop every alias and collection whose name starts with `prefix` (a test run's or a
    benchmark's namespace). Aliases first: dropping a collection would drop them silently."""
    if not prefix:
        raise ValueError("refusing to drop every collection: give a non-empty prefix")
    for name in client.list_aliases()["aliases"]:
        if name.startswith(prefix):
            client.drop_alias(name)
    for name in client.list_collections():
        if name.startswith(prefix):
            client.drop_collection(name)
