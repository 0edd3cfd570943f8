"""Settings from `COFEAT_*` environment variables, validated once at start-up.

A missing or malformed setting stops the process with one line naming it. Secrets are
`SecretStr` so they never reach logs, reprs or error messages.
"""

from __future__ import annotations

import json
import sys
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

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    metrics_port: int = Field(0, ge=0, le=65535, description="0 disables /metrics")

    ingest_group: str = "cofeat-ingest"
    ingest_max_records: int = Field(5000, ge=1)
    ingest_poll_timeout_ms: int = Field(500, ge=1)
    ingest_retry_max_s: float = Field(30.0, gt=0)

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


def _describe(error: ValidationError) -> str:
    # Only the field name and pydantic's message: the input value may be a secret.
    first = error.errors()[0]
    name = ENV_PREFIX + "_".join(str(part) for part in first["loc"]).upper()
    return f"invalid setting {name}: {first['msg']}"


def load_settings(**overrides) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


def exit_on_settings_error(error: SettingsError) -> None:
    print(f"cofeat: {error}", file=sys.stderr)
    raise SystemExit(2)
