"""Kept for helpers written against its old place: MMS media fetching lives in
`kernel.media`, and helpers get it from `helpers.sdk` (``fetch_media``)."""

from kernel.media import ALLOWED_MEDIA_TYPES, MediaRefusedError, fetch_media

__all__ = ["ALLOWED_MEDIA_TYPES", "MediaRefusedError", "fetch_media"]
