import uuid

from kafka import KafkaProducer, TopicPartition

from shared.kafka.admin import ensure_topics
from shared.kafka.config import client_config
from shared.kafka.offsets import highwaters, topic_partitions, topic_size
from shared.settings import Settings

PER_PARTITION = (100_000, 60_000, 1, 0)


def fill(settings: Settings, topic: str) -> None:
    producer = KafkaProducer(**client_config(settings), linger_ms=20, batch_size=256_000)
    payload = b"x" * 10  # small records: a 1 MB fetch holds tens of thousands
    for partition, count in enumerate(PER_PARTITION):
        for _ in range(count):
            producer.send(topic, payload, partition=partition)
    producer.flush()
    producer.close()


def test_high_watermarks_of_every_partition_even_behind_a_long_one(broker, tmp_path):
    settings = Settings(kafka_bootstrap=broker, data_dir=tmp_path, kafka_partitions=4,
                        topic_prefix=f"t{uuid.uuid4().hex[:8]}.")
    topic = f"{settings.topic_prefix}offsets"
    ensure_topics(settings, (topic,))
    fill(settings, topic)

    tps = topic_partitions(settings, topic)
    assert len(tps) == 4
    # A partition with records never read drained one record per poll before: the
    # watermarks behind it came too late or not at all.
    ends = highwaters(settings, tps, timeout_s=5.0)
    assert ends == {TopicPartition(topic, p): n for p, n in enumerate(PER_PARTITION)}
    assert topic_size(settings, topic) == sum(PER_PARTITION)
