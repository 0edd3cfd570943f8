"""kafka-python client arguments from settings, so Apache Kafka with TLS/SASL works unchanged."""

from __future__ import annotations

from shared.settings import Settings


def client_config(settings: Settings) -> dict:
    config: dict = {
        "bootstrap_servers": settings.require_kafka_bootstrap().split(","),
        "client_id": settings.kafka_client_id,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            config["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_cafile:
        config["ssl_cafile"] = str(settings.kafka_ssl_cafile)
    return config


def consumer_config(settings: Settings, group_id: str, **overrides) -> dict:
    config = client_config(settings) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": settings.kafka_heartbeat_interval_ms,
        "max_poll_records": settings.ingest_max_records,
    }
    return config | overrides


def producer_config(settings: Settings, **overrides) -> dict:
    config = client_config(settings) | {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 5,
        "retries": 10,
    }
    return config | overrides
