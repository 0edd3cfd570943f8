"""`cofeat dev`: the local stack (Postgres, Kafka-protocol broker, Milvus) without Docker."""
