"""Settings from `COFEAT_*` environment variables, validated once at start-up.

A missing or malformed setting stops the process with one line naming it. Secrets are
`SecretStr` so they never reach logs, reprs or error messages.
"""

from __future__ import annotations

import json
import os
import re
import sys
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "COFEAT_"


class SettingsError(RuntimeError):
    """A setting is missing or malformed; the message is one line and holds no secret."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    data_dir: Path = Path("data")

    # Left unset, these fall back to the local stack `cofeat dev up` started under data_dir.
    database_url: SecretStr | None = None
    kafka_bootstrap: str | None = None
    milvus_uri: str | None = None

    database_sslmode: Literal[
        "disable", "allow", "prefer", "require", "verify-ca", "verify-full"
    ] | None = None
    database_sslrootcert: Path | None = None

    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_client_id: str = "cofeat"
    topic_prefix: str = Field("", pattern=r"^[A-Za-z0-9._-]*$",
                              description="prepended to every topic name")
    kafka_partitions: int = Field(4, ge=1, description="partitions for topics cofeat creates")
    kafka_replication_factor: int = Field(1, ge=1)
    kafka_session_timeout_ms: int = Field(10_000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(3_000, ge=100)

    milvus_token: SecretStr | None = None
    milvus_prefix: str = Field("", pattern=r"^[A-Za-z0-9_]*$",
                               description="prepended to collection and alias names")
    milvus_timeout_s: float = Field(10.0, gt=0)
    milvus_hnsw_m: int = Field(16, ge=4, le=64)
    milvus_hnsw_ef_construction: int = Field(200, ge=8)
    milvus_search_ef: int = Field(64, ge=1)

    # Ports `cofeat dev up` gives the servers it starts (Postgres listens on a unix socket).
    dev_kafka_port: int = Field(19092, ge=1, le=65535)
    dev_milvus_port: int = Field(19530, ge=1, le=65535)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    metrics_port: int = Field(0, ge=0, le=65535, description="0 disables /metrics")

    run_services: str = Field("ingest,refresh,embed,serve",
                              description="what `cofeat run` starts, comma-separated")
    run_ingest_replicas: int = Field(1, ge=1, le=64)

    ingest_group: str = "cofeat-ingest"
    ingest_max_records: int = Field(
        20_000, ge=1, description="most events in one batch, one transaction; each batch "
        "costs a few round trips, so larger ones store faster (benchmarks/ingest.py)")
    ingest_poll_timeout_ms: int = Field(500, ge=1)
    ingest_retry_max_s: float = Field(30.0, gt=0)
    ingest_synchronous_commit: Literal["on", "off"] = Field(
        "on", description="Postgres synchronous_commit for ingest's writes; off does not "
        "wait for the WAL flush: a server crash can lose the last ~0.6 s of commits, with "
        "the offsets stored in them, so those events are read and stored again")

    # The consumer runtime (shared/kafka/) that ingest and the embedder's stream share.
    kafka_max_poll_interval_ms: int = Field(
        300_000, ge=1000, description="a consumer that does not poll for this long leaves "
        "its group (and /healthz says it stalled); outages never stop the polling")
    kafka_rebalance_timeout_s: float = Field(
        10.0, gt=0, description="the most a rebalance callback waits: for the batch being "
        "stored, or for the stored offsets")
    max_future_skew: timedelta = Field(
        timedelta(minutes=5), ge=timedelta(0), description="events whose ts is further "
        "ahead of the consumer's clock are dead-lettered as `bad_ts: future` (seconds, "
        "or ISO 8601 like PT5M)")
    dlq_max_bytes: int = Field(
        1_000_000, ge=4096, description="the largest dead letter the broker takes (Kafka's "
        "message.max.bytes, ~1 MB by default): longer ones are truncated and flagged")

    # Factorization (docs/factors.md). Confidence per (user, project) pair:
    # 1 + als_alpha * log(1 + sum of event weights / als_eps).
    als_factors: int = Field(64, ge=1)
    als_regularization: float = Field(0.05, ge=0)
    als_alpha: float = Field(4.0, gt=0)
    als_eps: float = Field(1.0, gt=0)
    als_iterations: int = Field(15, ge=1)
    als_threads: int = Field(0, ge=0, description="0: all cores")
    als_use_gpu: bool = Field(True, description="use implicit.gpu when CUDA is present")
    als_incremental_sweeps: int = Field(2, ge=1, description="later passes: new rows only")
    als_seed: int = 0
    weight_view: float = Field(1.0, ge=0)
    weight_appreciate: float = Field(4.0, ge=0)
    weight_comment: float = Field(4.0, ge=0)
    weight_own: float = Field(8.0, ge=0)
    filter_min_user_count: int = Field(3, ge=0, description="projects a user needs to stay")
    filter_min_item_count: int = Field(3, ge=0, description="users a project needs to stay")
    filter_top_user_pct: float = Field(0.1, ge=0, lt=100, description="most active users dropped")
    filter_top_item_pct: float = Field(0.1, ge=0, lt=100, description="most popular dropped")
    eval_fraction: float = Field(0.05, gt=0, le=1, description="users with one held-out pair")
    eval_max_users: int = Field(5000, ge=1)
    eval_k: int = Field(20, ge=1)
    refresh_nice: int = Field(
        10, ge=0, le=19, description="CPU niceness the refresh takes at start: factorizing "
        "and training are batch work, and on shared cores the stream (ingest, embedder) "
        "should win; 0 leaves it as started")
    refresh_full_every: int = Field(24, ge=1, description="full refit after N versions")
    refresh_full_max_age_s: float = Field(86_400.0, gt=0, description="or when this old")
    refresh_drift_threshold: float = Field(
        0.1, gt=0, description="full refit when changed/total non-zeros since the last one exceeds")
    refresh_promote_margin: float = Field(
        0.1, ge=0, description="reject if recall@k < parent's * (1 - margin)")
    # The periodic refresh (`cofeat refresh --loop`, and `cofeat run`): factors, then the CNN.
    refresh_every: str = Field("10m", description="start to start: 90s, 10m, 1.5h, 1d or "
                               "plain seconds")
    # Where full factor fits run (docs/factors.md, "On Apache Spark"): implicit in this
    # process, or Spark MLlib's ALS on the cluster COFEAT_SPARK_MASTER names.
    factors_engine: Literal["implicit", "spark"] = "implicit"
    spark_master: str = Field("local[2]", description="local[N], spark://host:port, yarn, "
                              "k8s://https://host:port")
    spark_exchange_dir: Path | None = Field(
        None, description="Parquet in and out of Spark; every executor must see it "
        "(default: COFEAT_DATA_DIR/spark)")
    spark_conf: dict[str, str] = Field(
        default_factory=dict, description='extra Spark settings, JSON: {"spark.executor.'
        'memory": "8g"}')

    # The query API (`cofeat serve`, `cofeat search`).
    api_token: SecretStr | None = Field(
        None, description="when set, query endpoints require `Authorization: Bearer <it>`")
    serve_host: str = "0.0.0.0"
    serve_port: int = Field(8080, ge=1, le=65535)
    serve_max_upload_bytes: int = Field(5 * 1024 * 1024, ge=1024)
    serve_new_window_s: float = Field(7 * 86_400.0, gt=0, description="'new' projects age")
    serve_model_check_s: float = Field(30.0, gt=0, description="how often to look for a "
                                       "newer CNN model")
    serve_cache_size: int = Field(10_000, ge=0, description="project vectors similar-to-"
                                  "project keeps (0: off)")
    serve_cache_ttl_s: float = Field(5.0, ge=0, description="how long a kept vector is "
                                     "used: how much staler than Milvus it may be")
    serve_image_concurrency: int = Field(2, ge=1, description="image queries decoding and "
                                         "embedding at once (each may hold a decoded image)")
    serve_image_wait_s: float = Field(2.0, ge=0, description="how long an image query waits "
                                      "for a free slot before a 503 with Retry-After")

    # Image access (shared/images): where an image_uri may point and what reading one may
    # cost. Lists are comma-separated. Every reader (embedder, refresh, eval, uploads) obeys.
    image_roots: str | None = Field(None, description="allowed local directories; unset: "
                                    "COFEAT_DATA_DIR/images")
    image_hosts: str = Field("", description="allowed HTTP(S) hosts: name, *.domain, IP "
                             "address, or * (any public host); none by default")
    image_buckets: str = Field("", description="allowed object-store locations: bucket or "
                               "scheme://bucket[/prefix] (a bare bucket means s3://)")
    image_s3_endpoint_url: str | None = Field(None, description="an S3-compatible endpoint "
                                              "(MinIO, Ceph); unset: AWS")
    image_max_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="per image, "
                                 "enforced while reading")
    image_max_pixels: int = Field(25_000_000, ge=1, description="width x height from the "
                                  "header, refused before decoding (decompression bombs)")
    image_connect_timeout_s: float = Field(5.0, gt=0)
    image_read_timeout_s: float = Field(10.0, gt=0, description="longest silence while reading "
                                        "(HTTP: rounded up to whole seconds)")
    image_fetch_timeout_s: float = Field(30.0, gt=0, description="one fetch, all of it")
    image_fetch_attempts: int = Field(3, ge=1, description="tries per fetch on transient "
                                      "failures (5xx, resets, timeouts) before it is "
                                      "recorded and retried later")
    image_fetch_concurrency: int = Field(16, ge=1, description="remote fetches in flight per "
                                         "process")
    image_cache_bytes: int = Field(2 * 1024**3, ge=0, description="local cache of remote "
                                   "images (LRU by bytes); 0: off")
    image_cache_dir: Path | None = Field(None, description="unset: COFEAT_DATA_DIR/cache/images")

    @field_validator("image_buckets")
    @classmethod
    def _buckets_name_a_bucket(cls, value: str) -> str:
        for entry in filter(None, (part.strip() for part in value.split(","))):
            if not entry.split("://", 1)[-1].split("/", 1)[0]:
                raise ValueError(f"{entry!r} names no bucket (bucket or scheme://bucket)")
        return value

    # Embedder (services/embedder): Kafka -> CNN -> Milvus.
    embed_group: str = "cofeat-embed"
    embed_max_records: int = Field(500, ge=1, description="events per stream batch at most")
    embed_poll_timeout_ms: int = Field(100, ge=1, description="short: freshness, not batching")
    embed_fetch_max_wait_ms: int = Field(
        50, ge=0, description="how long the broker may hold an empty fetch: an event arriving "
        "meanwhile can wait that long (brokers that answer early lose nothing by it)")
    embed_batch_size: int = Field(64, ge=1, description="images per model forward pass")
    embed_workers: int = Field(2, ge=0, description="image decode threads for backfills")
    embed_device: Literal["auto", "cpu", "cuda"] = "auto"
    embed_backfill_chunk: int = Field(512, ge=1, description="projects per backfill step at most")
    embed_backfill_step_s: float = Field(
        0.5, gt=0, description="work per backfill step: how long stream events wait behind one")
    embed_torch_threads: int = Field(0, ge=0, description="CPU threads for the CNN; 0: torch's "
                                     "default, one per core")
    embed_insert_rows: int = Field(2000, ge=1, description="rows per Milvus insert call")
    embed_max_attempts: int = Field(3, ge=1, description="image failures before parking")
    embed_retry_interval_s: float = Field(30.0, ge=0, description="between image retries")
    embed_model_poll_s: float = Field(10.0, gt=0, description="how often to look for a new CNN")
    embed_drop_grace_s: float = Field(300.0, ge=0,
                                      description="keep a replaced collection this long")
    embed_index_wait_s: float = Field(
        600.0, ge=0, description="a backfill waits this long for its HNSW index before it "
        "swaps anyway, loaded and counted (queries scan unindexed rows until it is built)")
    embed_retry_max_s: float = Field(30.0, gt=0, description="backoff cap for outages")
    embed_ingest_wait_s: float = Field(
        30.0, gt=0, description="how long a stream event waits for ingest to store it")
    embed_reconcile_every_s: float = Field(
        300.0, ge=0, description="compare the live collection with Postgres (0: never)")
    embed_standby_poll_s: float = Field(
        2.0, gt=0, description="how often a standby replica tries to take the leader lock")

    # Warm-up of new projects (shared/warmup.py, services/embedder/warmup.py): projects the
    # live CNN's factor version does not know get their first interactions folded in.
    warm_enabled: bool = Field(True, description="keep the warm-up collection up to date")
    warm_poll_s: float = Field(2.0, gt=0, description="how often to look for new interactions")
    warm_prior_strength: float = Field(
        0.5, gt=0, description="weight of the CNN's vector against the interactions, in "
        "units of ALS's item regulariser (Y'Y + lambda I)")

    # CNN refresh (services/refresh/cnn): image -> latent factor.
    cnn_mode: Literal["regress", "pseudo-class"] = "regress"
    cnn_loss: Literal["cosine", "mse"] = "cosine"
    # The default recipe was chosen by benchmarks/recipes.py (docs/evaluation.md, "Recipe
    # sweep"): fine-tuned from ImageNet, it beat every scratch-trained cell several-fold.
    cnn_backbone: Literal["resnet18", "small", "mobilenet_v2"] = "mobilenet_v2"
    cnn_init: Literal["auto", "scratch", "imagenet"] = Field(
        "auto", description="imagenet: start from ImageNet weights (packaged for "
        "mobilenet_v2; others need COFEAT_CNN_WEIGHTS); auto: imagenet where packaged")
    cnn_stem: Literal["small-image", "imagenet"] = Field(
        "imagenet", description="resnet18 stem; small-image keeps more resolution, ~4x cost")
    cnn_feature: Literal["head", "penultimate"] = Field(
        "head", description="what is served: factor-space head output or penultimate layer")
    cnn_image_size: int = Field(128, ge=16, le=512)
    cnn_epochs: int = Field(5, ge=1, description="epochs of a full (re)train")
    cnn_refresh_epochs: int = Field(3, ge=1, description="epochs of a fine-tune")
    cnn_batch_size: int = Field(64, ge=1)
    cnn_lr: float = Field(2e-3, gt=0)
    cnn_pseudo_classes: int = Field(64, ge=2)
    cnn_val_fraction: float = Field(0.1, gt=0, lt=1)
    cnn_holdout_salt: int = 0
    cnn_seed: int = 0
    cnn_workers: int = Field(2, ge=0, description="DataLoader decode processes")
    cnn_hflip: bool = Field(False, description="mirrors glyphs; off by default")
    cnn_full_every: int = Field(10, ge=1, description="full retrain after N fine-tunes")
    cnn_promote_margin: float = Field(0.02, ge=0, description="allowed val score drop")
    cnn_min_projects: int = Field(20, ge=1)
    cnn_weights: Path | None = Field(
        None, description="local torchvision checkpoint the backbone starts from "
                          "(e.g. resnet18/resnet50/mobilenet_v2 ImageNet weights)")

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap_has_ports(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError("must be host:port[,host:port...]")
        return value

    @field_validator("api_token")
    @classmethod
    def _api_token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # Blank must not read as "no authentication": unset the variable for that. A bearer
        # header cannot carry surrounding whitespace, so such a token could never match.
        token = value.get_secret_value() if value is not None else None
        if token is not None and not token.strip():
            raise ValueError("is empty or blank; unset it to serve without authentication")
        if token is not None and token.strip() != token:
            raise ValueError("starts or ends with whitespace")
        return value

    @field_validator("refresh_every")
    @classmethod
    def _refresh_every_is_an_interval(cls, value: str) -> str:
        interval_seconds(value)
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith("postgresql"):
            raise ValueError("must be a postgresql:// URL")
        return value

    # -- resolved endpoints: explicit setting first, then the local stack --------------

    @property
    def stack_file(self) -> Path:
        return self.data_dir / "dev" / "stack.json"

    def _stack_value(self, key: str) -> str | None:
        try:
            return json.loads(self.stack_file.read_text()).get(key)
        except (OSError, ValueError):
            return None

    def require_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return self._require_stack("database_url", "COFEAT_DATABASE_URL")

    def require_kafka_bootstrap(self) -> str:
        return self.kafka_bootstrap or self._require_stack("kafka_bootstrap",
                                                           "COFEAT_KAFKA_BOOTSTRAP")

    def require_milvus_uri(self) -> str:
        return self.milvus_uri or self._require_stack("milvus_uri", "COFEAT_MILVUS_URI")

    def _require_stack(self, key: str, env_name: str) -> str:
        value = self._stack_value(key)
        if value is None:
            raise SettingsError(
                f"{env_name} is not set and no local stack runs under {self.data_dir} "
                "(run `cofeat dev up` or set it)"
            )
        return value


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def interval_seconds(text: str) -> float:
    """'90s', '10m', '1.5h', '1d' or plain seconds, more than 0; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match[1]) <= 0:
        raise ValueError(f"{text!r} is not an interval like 10m, 90s or 1h")
    return float(match[1]) * _UNITS[match[2] or "s"]


# Old names still read for now, each with a warning: old variable -> (new variable, field).
RENAMED = {"COFEAT_RUN_REFRESH_EVERY": ("COFEAT_REFRESH_EVERY", "refresh_every"),
           "COFEAT_REFRESH_INTERVAL_S": ("COFEAT_REFRESH_EVERY", "refresh_every"),
           "COFEAT_CNN_PRETRAINED": ("COFEAT_CNN_WEIGHTS", "cnn_weights")}
_warned: set[str] = set()


def _renamed() -> dict:
    values: dict = {}
    for old, (new, field) in RENAMED.items():
        if old not in os.environ:
            continue
        if new in os.environ or field in values:
            raise SettingsError(f"{old} is an old name of {new}: set only {new}")
        values[field] = os.environ[old]
        if old not in _warned:
            _warned.add(old)
            print(f"cofeat: warning: {old} is deprecated and will stop working: rename it "
                  f"{new} (same format; read as {new} for now)", file=sys.stderr)
    return values


def _describe(error: ValidationError) -> str:
    # Only the field name and pydantic's message: the input value may be a secret.
    first = error.errors()[0]
    name = ENV_PREFIX + "_".join(str(part) for part in first["loc"]).upper()
    return f"invalid setting {name}: {first['msg']}"


def load_settings(**overrides) -> Settings:
    try:
        return Settings(**(_renamed() | overrides))
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


def exit_on_settings_error(error: SettingsError) -> None:
    print(f"cofeat: {error}", file=sys.stderr)
    raise SystemExit(2)
