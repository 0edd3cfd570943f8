from kafka import KafkaProducer
from sqlalchemy import inspect

from shared.db.engine import make_engine, require_current_schema
from shared.kafka.admin import ensure_topics
from shared.kafka.config import producer_config


def test_servers_answer(settings):
    engine = make_engine(settings)
    require_current_schema(engine)
    assert "interactions" in inspect(engine).get_table_names()
    created = ensure_topics(settings)
    assert len(created) == 4
    assert ensure_topics(settings) == []
    producer = KafkaProducer(**producer_config(settings))
    producer.send(settings.topic_prefix + "cofeat.interactions", b"{}").get(10)
    producer.close()
