"""The CNN that embeds uploaded images, kept in step with the vectors behind the alias.

An uploaded image must be embedded by the same CNN version that embedded the projects it
is compared with. The projects alias points at `<prefix>cofeat_projects_v<version>`, and
the embedder moves it only once a new version's collection is complete, so the model to
use is that version's; the newest promoted CNN is the fallback when the alias names none.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from shared.client import CofeatClient
from shared.logs import bind
from shared.metrics import MODEL_VERSION
from shared.settings import Settings, SettingsError

log = logging.getLogger("cofeat.serve")


class BadImage(ValueError):
    """The upload is not an image we can decode (or is a decompression bomb)."""


class NoModel(RuntimeError):
    """No CNN version is live, so images cannot be embedded."""


@dataclass(frozen=True)
class LiveModel:
    version: int
    model: object  # shared.vision.CofeatNet (torch is imported lazily)


class ModelHolder:
    """Holds the live model; `refresh` swaps in a new one with a single reference
    assignment, so a request sees either the old model or the new one, never a mix."""

    def __init__(self, settings: Settings, client: CofeatClient) -> None:
        self.settings = settings
        self.client = client
        self.live: LiveModel | None = None
        self._engine = None
        self._lock = threading.Lock()  # one loader at a time; readers never wait

    def require(self) -> LiveModel:
        live = self.live
        if live is None:
            raise NoModel("no CNN model is live (none promoted, or its files are missing): "
                          "image search needs one; train one with `cofeat refresh`")
        return live

    def refresh(self) -> LiveModel | None:
        with self._lock:
            row = self._wanted_row()
            if row is not None and (self.live is None or self.live.version != row["id"]):
                from shared.cnn import load_cnn

                model, _meta = load_cnn(self.settings.data_dir, row, device="cpu")
                self.live = LiveModel(int(row["id"]), model)
                MODEL_VERSION.labels("cnn", "serve").set(self.live.version)
                bind(model_version=self.live.version)
                log.info("serving CNN version %d for image search", row["id"])
            return self.live

    def watch(self, stop: threading.Event) -> None:
        """Refresh every serve_model_check_s until `stop` is set (run in a thread)."""
        while not stop.wait(self.settings.serve_model_check_s):
            try:
                self.refresh()
            except Exception:
                log.exception("checking for a newer CNN model failed; keeping the current one")

    def _wanted_row(self) -> dict | None:
        from shared.cnn import cnn_version, current_cnn_version

        engine = self._db()
        if engine is None:
            return None
        try:
            version = self.client.collection_version()
        except Exception:  # alias missing or Milvus down: the promoted model is the guess
            version = None
        row = cnn_version(engine, version) if version is not None else None
        return row or current_cnn_version(engine)

    def _db(self):
        if self._engine is None:
            from shared.db.engine import make_engine

            try:
                self._engine = make_engine(self.settings)
            except SettingsError as error:
                log.warning("no database, so no CNN model for image search: %s", error)
                return None
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


def embed_bytes(live: LiveModel, data: bytes, settings: Settings) -> np.ndarray:
    """One L2-normalized vector for an encoded image (JPEG, PNG, ...), decoded under
    COFEAT_IMAGE_MAX_PIXELS like every other image (shared.images.decode): a bomb is
    refused from its header, a large JPEG decodes at reduced scale."""
    from shared.images import ImageError, decode
    from shared.vision import embed_images

    try:
        img = decode(data, live.model.config.image_size, settings.image_max_pixels)
    except ImageError as error:
        raise BadImage(error.reason) from None
    return embed_images(live.model, [img], batch_size=1)[0]
