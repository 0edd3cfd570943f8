import time
import uuid

from kafka import KafkaConsumer, TopicPartition
from typer.testing import CliRunner

from services.cli import app
from services.simulate.behaviour import generate
from services.simulate.stream import Encoder, records
from services.simulate.world import build_world, preset
from shared import events, topics
from shared.kafka.config import client_config
from shared.settings import Settings


def read_all(settings: Settings, expected: int, timeout: float = 30.0) -> list:
    consumer = KafkaConsumer(**client_config(settings), group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        parts = [TopicPartition(t, p) for t in topics.source_topics(settings.topic_prefix)
                 for p in consumer.partitions_for_topic(t) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        got, deadline = [], time.monotonic() + timeout
        while len(got) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(500).values():
                got += [(m.topic, m.key, m.value) for m in batch]
        return got
    finally:
        consumer.close()


def test_cli_publishes_to_kafka(broker, tmp_path):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    env = {"COFEAT_KAFKA_BOOTSTRAP": broker, "COFEAT_TOPIC_PREFIX": prefix,
           "COFEAT_DATA_DIR": str(tmp_path)}
    args = ["simulate", "--preset", "tiny", "--events", "3000", "--no-images",
            "--invalid-fraction", "0.05", "--duplicate-fraction", "0.05"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output

    # The same seed gives the same stream in-process.
    world = build_world(preset("tiny", events=3000))
    encoder = Encoder(world, tmp_path / "images", "png", prefix)
    sent = list(records(world, generate(world), encoder, invalid_fraction=0.05,
                        duplicate_fraction=0.05))
    settings = Settings(kafka_bootstrap=broker, topic_prefix=prefix, data_dir=tmp_path)
    got = read_all(settings, len(sent))
    assert sorted(got) == sorted(sent)
    # Per key (so per partition) the order is the simulator's order.
    for topic in topics.source_topics(prefix):
        for key in {k for t, k, _v in sent if t == topic}:
            assert ([v for t, k, v in got if t == topic and k == key]
                    == [v for t, k, v in sent if t == topic and k == key])
    valid = [v for t, _k, v in got if t == prefix + topics.PROJECTS
             and _parses(events.parse_project, v)]
    assert valid and events.parse_project(valid[0]).image_uri.startswith(str(tmp_path))


def _parses(parse, value) -> bool:
    try:
        parse(value)
    except events.InvalidEvent:
        return False
    return True
