"""Putting resolved project states into collections: the one write path to Milvus.

Whoever asks (the stream, a backfill page, a retry, a repair) hands over what each project
should look like - its current live state, or None for "no row" - and the writer makes
each target collection hold exactly that: rows already at that state version are left
alone (a replayed or duplicate event costs one query, not an embed), others are embedded
with the collection's own model and upserted, the rest deleted. A state whose image is
broken loses its row too (a collection never shows an image the project no longer has);
one whose storage did not answer keeps the row it had until the retry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.embedder import collections as mv
from services.embedder.encode import Encoder
from services.embedder.states import State
from shared.images import is_transient_reason
from shared.retry import describe
from shared.settings import Settings


@dataclass(frozen=True)
class Target:
    """A collection and the model whose vectors it holds."""

    name: str
    encoder: Encoder


@dataclass
class Written:
    embedded: int = 0  # images embedded, over all targets
    unchanged: int = 0  # rows already at the wanted state version
    deleted: int = 0
    failed: dict[int, tuple[State, str]] = field(default_factory=dict)  # by project_id
    refused: set[int] = field(default_factory=set)  # Milvus refused the row: park at once
    seconds: float = 0.0  # spent in the model

    def done(self, wanted: dict[int, State | None]) -> list[int]:
        """Projects now right in every target."""
        return [project_id for project_id in wanted if project_id not in self.failed]


class Writer:
    def __init__(self, settings: Settings, milvus: mv.Milvus):
        self.settings, self.milvus = settings, milvus

    def apply(self, wanted: dict[int, State | None], targets: list[Target]) -> Written:
        written = Written()
        for target in targets:
            self._apply_one(wanted, target, written)
        return written

    def _apply_one(self, wanted: dict[int, State | None], target: Target,
                   written: Written) -> None:
        live = [s for s in wanted.values() if s is not None]
        held = mv.held_versions(self.milvus, target.name, [s.project_id for s in live])
        todo = [s for s in live if held.get(s.project_id) != s.version]
        written.unchanged += len(live) - len(todo)
        started = time.perf_counter()
        result = target.encoder.embed(todo)
        written.seconds += time.perf_counter() - started
        written.embedded += len(todo)
        refused = mv.upsert(self.milvus, [target.name], result.rows,
                            self.settings.embed_insert_rows)
        by_id = {state.project_id: state for state in todo}
        for row, error in refused:  # the same call fails again: not worth a retry
            pid = row["project_id"]
            result.failed.append((by_id[pid], f"milvus refused: {describe(error)}"))
            written.refused.add(pid)
        gone = [pid for pid, state in wanted.items() if state is None]
        # An image its storage did not serve keeps the row it has until the retry.
        gone += [state.project_id for state, why in result.failed
                 if not is_transient_reason(why)]
        mv.delete(self.milvus, [target.name], gone)
        written.deleted += len(gone)
        written.failed.update({state.project_id: (state, why) for state, why in result.failed})
