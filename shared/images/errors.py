"""Why an image could not be read: one stable, short reason per kind, transient or not.

The reason is what `embed_failures.reason` and the logs keep. A refusal by policy always
gives the same text, whatever the path or URL and whether or not something exists there,
so probing with image_uris tells an observer nothing about the machine or its network.
"""

from __future__ import annotations

from shared.retry import Permanent, Transient

REFUSED = "refused: not an allowed image location"
TRANSIENT_PREFIX = "unavailable: "  # every transient reason starts so, and no other


def is_transient_reason(reason: str) -> bool:
    """Whether a stored reason says "try again later" (embed_failures keeps only text)."""
    return reason.startswith(TRANSIENT_PREFIX)


class ImageError(Exception):
    """An image_uri that yields no image; `reason` is one line, safe to store and show."""

    transient = False

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Unreadable(ImageError, Permanent):
    """Permanent: the same read fails the same way (parked after the attempts run out)."""


class Refused(Unreadable):
    """The policy does not allow this location, or it is not a regular file."""

    def __init__(self):
        super().__init__(REFUSED)


class NotFound(Unreadable):
    def __init__(self, detail: str = ""):
        super().__init__(f"not found{': ' + detail if detail else ''}")


class Denied(Unreadable):
    def __init__(self, detail: str = ""):
        super().__init__(f"access denied{': ' + detail if detail else ''}")


class TooLarge(Unreadable):
    def __init__(self, limit: int):
        super().__init__(f"too large: more than {limit} bytes (COFEAT_IMAGE_MAX_BYTES)")


class TooManyPixels(Unreadable):
    def __init__(self, limit: int, width: int | None = None, height: int | None = None):
        size = f"{width}x{height} is " if width is not None else ""
        super().__init__(f"too many pixels: {size}more than {limit} (COFEAT_IMAGE_MAX_PIXELS)")


class NotAnImage(Unreadable):
    def __init__(self, detail: str):
        super().__init__(f"not an image: {detail}"[:240])


class Unavailable(ImageError, Transient):
    """Transient: a 5xx, a reset, a timeout. Worth trying again later, never parked."""

    transient = True

    def __init__(self, detail: str):
        super().__init__(f"{TRANSIENT_PREFIX}{detail}"[:240])
