"""One way to read an image: an image_uri (local path, file://, http(s)://, s3:// or another
fsspec scheme) to bytes under the policy and bounds of COFEAT_IMAGE_*, then to pixels.

Every reader uses it: the CNN refresh and `cofeat eval` (training and features), the
embedder (backfill and stream) and `cofeat serve`'s uploads (`decode` only). See
docs/operations.md, "Images".
"""

from shared.images.decode import decode, rgb
from shared.images.errors import (
    REFUSED,
    Denied,
    ImageError,
    NotAnImage,
    NotFound,
    Refused,
    TooLarge,
    TooManyPixels,
    Unavailable,
    Unreadable,
    is_transient_reason,
)
from shared.images.policy import Policy
from shared.images.reader import ImageReader, Limits, local_files, ordered

__all__ = ["REFUSED", "Denied", "ImageError", "ImageReader", "Limits", "NotAnImage",
           "NotFound", "Policy", "Refused", "TooLarge", "TooManyPixels", "Unavailable",
           "Unreadable", "decode", "is_transient_reason", "local_files", "ordered", "rgb"]
