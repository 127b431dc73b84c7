"""The field tables every part of the pipeline shares: the modalities, the member a sample of each must
carry, and the members a sample may carry at all."""

from __future__ import annotations

MODALITIES = ("text", "code", "image", "audio", "video")
# The member a sample of each modality must carry (besides its caption, `txt`, for the paired ones).
MEDIA_FIELDS = {"image": ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"),
                "audio": ("wav", "flac", "mp3", "ogg", "opus", "m4a", "aac"),
                "video": ("mp4", "webm", "mkv", "avi", "mov", "gif"),
                "code": ("py", "code", "js", "c", "cpp", "java", "go", "rs")}


KNOWN_EXTENSIONS = {ext for exts in MEDIA_FIELDS.values() for ext in exts} | {"txt", "json"}
"""Members a sample may carry: media, its caption or text, and metadata (img2dataset's `json`)."""


def check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; known: {list(MODALITIES)}")
