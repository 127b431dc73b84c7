"""Decoders from raw shard members to model inputs: Pillow images, soundfile audio as log-mel frames,
PyAV video as sampled frames, and UTF-8 text. A decoder raises `BadSample` naming what is wrong."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .shards import MEDIA_FIELDS


class BadSample(Exception):
    """A sample that cannot be used; `reason` is its counter's name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class MediaConfig:
    """How media become model inputs; `from_model` takes the sizes from a SkillNetConfig."""

    image_size: int = 224
    num_frames: int = 8
    sample_rate: int = 16_000
    num_mel_bins: int = 80
    max_audio_frames: int = 3000
    n_fft: int = 400
    hop_length: int = 160

    @classmethod
    def from_model(cls, config) -> "MediaConfig":
        return cls(image_size=config.image_size, num_frames=config.num_frames, num_mel_bins=config.num_mel_bins,
                   max_audio_frames=config.max_audio_frames)


def _media_member(sample: dict, modality: str) -> bytes:
    for ext in MEDIA_FIELDS[modality]:
        if ext in sample:
            return sample[ext]
    raise BadSample("missing_member", f"no {modality} member ({'/'.join(MEDIA_FIELDS[modality])})")


def decode_text(data: bytes | None, what: str = "txt") -> str:
    if data is None:
        raise BadSample("missing_member", f"no {what} member")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample("undecodable_text", str(e)) from None
    if not text:
        raise BadSample("empty_caption" if what == "txt" else "empty_text", f"empty {what}")
    return text


def _image_tensor(image, size: int) -> torch.Tensor:
    """Resize the short side to `size` and centre-crop: (3, size, size) uint8. The model's front-end
    normalises, so batches cross processes and reach the device at a quarter of float32's bytes."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_image(data: bytes, cfg: MediaConfig) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _image_tensor(image, cfg.image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample("undecodable_image", f"{type(e).__name__}: {e}") from None


@lru_cache(maxsize=8)
def _sinc_kernel(orig: int, new: int, zeros: int = 6, rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    """Hann-windowed sinc filters for rational resampling orig -> new (already divided by their gcd)."""
    cutoff = min(orig, new) * rolloff
    width = math.ceil(zeros * orig / cutoff)
    taps = torch.arange(-width, width + orig, dtype=torch.float64) / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None] / new + taps[None, :]) * cutoff
    t = t.clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    return (sinc * window * cutoff / orig).float().unsqueeze(1), width


def resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Band-limited resampling of a mono waveform (windowed sinc, as in torchaudio's default)."""
    if orig == new:
        return wave
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    kernel, width = _sinc_kernel(orig, new)
    padded = F.pad(wave.view(1, 1, -1), (width, width + orig))
    out = F.conv1d(padded, kernel, stride=orig).transpose(1, 2).reshape(-1)
    return out[: math.ceil(new * wave.numel() / orig)]


@lru_cache(maxsize=8)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale, area-normalised."""
    def to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(to_mel(0.0), to_mel(sample_rate / 2), n_mels + 2))
    lower = (bins[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - bins[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    filters = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(filters).float()


def log_mel(wave: torch.Tensor, cfg: MediaConfig) -> torch.Tensor:
    """(num_mel_bins, frames) log-mel spectrogram, scaled to roughly [-1, 1] (Whisper's normalisation)."""
    window = torch.hann_window(cfg.n_fft)
    spec = torch.stft(wave, cfg.n_fft, cfg.hop_length, window=window, return_complex=True)
    power = spec[:, :-1].abs() ** 2
    mel = mel_filters(cfg.sample_rate, cfg.n_fft, cfg.num_mel_bins) @ power
    logs = mel.clamp(min=1e-10).log10()
    logs = torch.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0)[:, : cfg.max_audio_frames]


def decode_audio(data: bytes, cfg: MediaConfig) -> torch.Tensor:
    import soundfile

    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, soundfile.LibsndfileError) as e:
        raise BadSample("undecodable_audio", f"{type(e).__name__}: {e}") from None
    if wave.shape[0] < cfg.n_fft:
        raise BadSample("undecodable_audio", f"only {wave.shape[0]} samples")
    mono = torch.from_numpy(wave).mean(dim=1)
    return log_mel(resample(mono, rate, cfg.sample_rate), cfg)


def decode_video(data: bytes, cfg: MediaConfig) -> torch.Tensor:
    """(num_frames, 3, size, size): frames sampled evenly over the clip."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1  # a loader worker is one core: FFmpeg's own threads would oversubscribe
            frames = [frame.to_image() for frame in container.decode(stream)]
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise BadSample("undecodable_video", f"{type(e).__name__}: {e}") from None
    if not frames:
        raise BadSample("undecodable_video", "no frames")
    picks = np.linspace(0, len(frames) - 1, cfg.num_frames).round().astype(int)
    return torch.stack([_image_tensor(frames[i], cfg.image_size) for i in picks])


def decode_sample(sample: dict, modality: str, cfg: MediaConfig) -> dict:
    """Raw members -> {"key", "text"/"code"/media tensor, "caption"} for one sample of `modality`."""
    out = {"key": sample["__key__"]}
    if modality == "text":
        out["text"] = decode_text(sample.get("txt"), "text")
        return out
    media = _media_member(sample, modality)
    out["caption"] = decode_text(sample.get("txt"))
    if modality == "code":
        out["code"] = decode_text(media, "code")
    elif modality == "image":
        out["pixel_values"] = decode_image(media, cfg)
    elif modality == "audio":
        out["input_features"] = decode_audio(media, cfg)
    else:
        out["pixel_values_videos"] = decode_video(media, cfg)
    return out
