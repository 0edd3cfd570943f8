"""`cofeat embed`: project images and users' factors into Milvus, swapped in by alias."""

from __future__ import annotations

import json
import logging
import os

import typer


def main(
    drain: bool = typer.Option(
        False, "--drain",
        help="Do any pending backfill and alias swap, catch up on the stream, exit "
        "(after waiting for the leader lock, like any replica)."),
    verify: bool = typer.Option(
        False, "--verify",
        help="Compare the live projects collection with Postgres (missing, extra and stale "
        "ids); exit 1 on drift. Reads only."),
    repair: bool = typer.Option(
        False, "--repair",
        help="Like --verify, then write what Postgres says for every drifted id (needs the "
        "leader lock: a running embedder repairs by itself)."),
) -> None:
    """Embed live projects with the promoted CNN into Milvus and keep them current."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: halves CPU/image
    from shared.startup import start_service

    settings, log = start_service("embed", consumer_group_setting="embed_group",
                                  needs_milvus=True)
    from services.embedder.encode import use_threads
    from services.embedder.leader import Replica, install_signal_handlers  # torch: slow

    use_threads(settings.embed_torch_threads)
    # pymilvus logs every failed RPC with a traceback; outages are logged once per interval.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    if verify or repair:
        from services.embedder.checks import run_check

        code, result = run_check(settings, repair)
        typer.echo(json.dumps(result))
        raise SystemExit(code)
    # Replicas are active/standby: this waits for the leader lock before touching Kafka or
    # Milvus, and goes back to waiting if it loses the lock.
    replica = Replica(settings, drain=drain)
    install_signal_handlers(replica)
    code = replica.run()
    log.info("exit %d", code)
    raise SystemExit(code)
