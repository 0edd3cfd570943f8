"""Which model serves, which collection is being built, and the aliases between them.

A collection is complete exactly when an alias points at it: the alias only moves after
the collection was filled, indexed, loaded and compared with Postgres. Every other
collection of ours is either being built here or left over, and retired after a grace
period. Alias moves and drops cannot be replayed harmlessly, so each one first confirms
that this replica still leads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg

from services.embedder import collections as mv
from services.embedder import metrics
from services.embedder.backfill import Backfill, BackfillFailed
from services.embedder.encode import Encoder
from services.embedder.writer import Target, Writer, Written
from shared import milvus as contract
from shared.cnn import cnn_version, current_cnn_version
from shared.images import ImageReader
from shared.logs import bind
from shared.settings import Settings

log = logging.getLogger("cofeat.embed")


class Lifecycle:
    def __init__(self, settings: Settings, milvus: mv.Milvus,
                 db: Callable[[], psycopg.Connection], writer: Writer,
                 confirm_leading: Callable[[], None],
                 on_written: Callable[[dict, Written], None], reader: ImageReader):
        self.settings, self.milvus, self.db, self.writer = settings, milvus, db, writer
        self.confirm_leading, self.on_written, self.reader = confirm_leading, on_written, reader
        self.encoders: dict[int, Encoder] = {}
        self.live: Target | None = None  # the collection behind the projects alias
        self.live_since_ms: float | None = None  # when a model first served (freshness)
        self.backfill: Backfill | None = None
        self.users_unavailable: int | None = None  # version whose users cannot be built
        self.retirement = mv.Retirement(settings.embed_drop_grace_s)
        self.next_model_check = 0.0
        self.recoveries_seen = 0
        self.failed = False  # a backfill could not start or failed its check
        self.waiting: int | None = None  # a newer CNN version waiting for the backfill

    def encoder(self, row: dict) -> Encoder:
        if row["id"] not in self.encoders:
            self.encoders[row["id"]] = Encoder(self.settings, row, self.reader)
        return self.encoders[row["id"]]

    def targets(self) -> list[Target]:
        """Every collection writes must reach: the live one and the one being built."""
        live = [self.live] if self.live is not None else []
        return live + (self.backfill.targets() if self.backfill is not None else [])

    # -- start-up ----------------------------------------------------------------------

    def discover(self) -> None:
        """Which collection the projects alias serves, and leftovers to retire."""
        alias = contract.alias(self.settings, contract.PROJECTS)
        target = mv.alias_target(self.milvus, alias)
        version = mv.version_of(self.settings, contract.PROJECTS, target) if target else None
        row = cnn_version(self.db(), version) if version else None
        if target and not mv.has_field(self.milvus, target, contract.STATE_VERSION):
            log.warning("alias %s is on %s, written by an older cofeat (no %s field): it "
                        "will be rebuilt", alias, target, contract.STATE_VERSION)
            row = None
        try:
            encoder = self.encoder(row) if row is not None else None
        except (OSError, ValueError, RuntimeError) as error:
            log.error("cannot load CNN v%s behind alias %s (%s): streaming waits for the "
                      "next backfill", version, alias, error)
            encoder = None
        if encoder is not None:
            self._go_live(Target(target, encoder), first=False)
            log.info("serving %s (CNN v%d) through alias %s", target, version, alias)
        elif target and version is None:
            log.warning("alias %s is on %s, which names no CNN version: it will be replaced",
                        alias, target)
        mv.schedule_leftovers(self.milvus, self.settings, self.retirement, keep=set())

    def _go_live(self, target: Target, first: bool) -> None:
        """`first`: no model served before, so events produced until now could not have
        been searchable in seconds; freshness counts those produced from now on."""
        if self.live is None:
            self.live_since_ms = time.time() * 1000 if first else 0.0
            if first:
                log.info("first model live: freshness is measured from now on")
        self.live = target
        self.encoders = {target.encoder.version: target.encoder}
        metrics.live_model(target.encoder.version)
        bind(model_version=target.encoder.version)

    # -- new models --------------------------------------------------------------------

    def check_model(self) -> None:
        if time.monotonic() < self.next_model_check:
            return
        self.next_model_check = time.monotonic() + self.settings.embed_model_poll_s
        row = current_cnn_version(self.db())
        if row is None or (self.backfill and self.backfill.version == row["id"]):
            return
        if self.backfill is not None and row["id"] > self.backfill.version:
            # A newer model waits for the backfill in progress: with models arriving faster
            # than a backfill completes, abandoning each for the next left none ever live.
            if self.waiting != row["id"]:
                log.info("CNN v%d is newer: finishing the backfill of v%d first", row["id"],
                         self.backfill.version)
                self.waiting = row["id"]
            return
        projects = self.live is None or self.live.encoder.version != row["id"]
        users = projects or (self.users_unavailable != row["id"]
                             and self._users_version() != row["id"])
        # Abandoning a backfill and starting one drop collections: only as the leader.
        self.confirm_leading()
        if self.backfill is not None:  # an older version is current again: a rollback
            log.info("CNN v%d is current again: abandoning the backfill of v%d", row["id"],
                     self.backfill.version)
            self.backfill.abandon()
            self.backfill = None
        if projects or users:
            try:
                self.start_backfill(row, projects, users)
            except (OSError, ValueError, RuntimeError) as error:
                # An unreadable artifact must not stop the stream on the live model.
                log.error("cannot backfill CNN v%d, retrying in %.0f s: %s", row["id"],
                          self.settings.embed_model_poll_s, error)
                self.failed = True

    def _users_version(self) -> int | None:
        target = mv.alias_target(self.milvus, contract.alias(self.settings, contract.USERS))
        return mv.version_of(self.settings, contract.USERS, target) if target else None

    def _projects_name(self, version: int) -> str:
        """A fresh name: an aliased collection of the same model (of an older schema) is
        never rebuilt in place."""
        rebuild = 0
        name = contract.collection_name(self.settings, contract.PROJECTS, version)
        while mv.aliased(self.milvus, name):
            rebuild += 1
            name = contract.collection_name(self.settings, contract.PROJECTS, version, rebuild)
        return name

    def start_backfill(self, row: dict, projects: bool, users: bool) -> None:
        encoder = self.encoder(row)
        target = Target(self._projects_name(encoder.version), encoder)
        backfill = Backfill(self.settings, self.milvus, self.db, self.writer, target,
                            projects, users, on_written=self.on_written)
        for name in (backfill.projects, backfill.users):
            self.retirement.cancel(name)
        backfill.start()
        if backfill.build_projects or backfill.build_users:
            self.backfill = backfill
        else:
            self.users_unavailable = backfill.version

    def backfill_step(self) -> None:
        if self.backfill is None or not self.backfill.step():
            return
        try:
            self.backfill.verify()
        except BackfillFailed as error:
            log.error("backfill of v%d failed its check, starting over later: %s",
                      self.backfill.version, error)
            self.confirm_leading()  # before the drop, like every other
            self.backfill.abandon()
            self.backfill, self.failed = None, True
            return
        self.confirm_leading()
        for name in self.backfill.swap():
            self.retirement.schedule(name)
        if self.backfill.build_projects:
            self._go_live(self.backfill.targets()[0], first=self.live is None)
        self.backfill = None

    # -- upkeep ------------------------------------------------------------------------

    def drop_retired(self) -> None:
        if self.retirement.any_due():
            self.confirm_leading()
        self.retirement.drop_due(self.milvus)

    def reload_after_outage(self) -> None:
        """Milvus 2.3.5 loads the aliased collections again after a restart; should a server
        not, queries would fail until the next swap, so ask for it."""
        if self.milvus.recoveries == self.recoveries_seen:
            return
        self.recoveries_seen = self.milvus.recoveries
        for kind in (contract.PROJECTS, contract.USERS):
            target = mv.alias_target(self.milvus, contract.alias(self.settings, kind))
            if target:
                mv.ensure_loading(self.milvus, target)
