"""Decoders from raw shard members to model inputs: Pillow images, soundfile (or PyAV) audio as log-mel
frames, PyAV video as sampled frames, and UTF-8 text. A decoder raises `BadSample` naming what is wrong.

Scraped data holds files crafted or broken in every way, so a decode costs what the model's input size
needs, not what a header claims: images are checked for pixels and aspect ratio before decoding, decoded
at a reduced scale where the format allows (JPEG) and cropped before they are resized; audio is read only
as far as the model's frames reach, and resampled with filters of bounded size; video keeps only the frames
it samples, each shrunk as soon as it is decoded. Running out of memory, or any other failure inside a
decoder, skips the sample (`decode_sample`)."""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from .fields import MEDIA_FIELDS


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


MAX_PIXELS = 40_000_000
"""Images and video frames with more pixels are skipped (PNG cannot decode at a reduced scale: 40M pixels
hold 160 MB as RGBA while decoding)."""
MAX_ASPECT = 20.0
"""Images and video frames longer than this many times their width (or wider) are skipped."""
MAX_VIDEO_FRAMES = 20_000
"""Frames decoded per video at most (11 minutes at 30 frames per second): a longer one is sampled from
its beginning."""


def _media_member(sample: dict, modality: str) -> bytes:
    for ext in MEDIA_FIELDS[modality]:
        if ext in sample:
            return sample[ext]
    found = sorted(k for k in sample if not k.startswith("__") and k != "txt")
    raise BadSample("missing_member", f"no {modality} member ({'/'.join(MEDIA_FIELDS[modality])})"
                    + (f"; found {', '.join(found)}" if found else ""))


def _check_size(width: int, height: int, what: str) -> None:
    """Refuse, before decoding, a picture whose header claims a size no model input needs."""
    if width <= 0 or height <= 0:
        raise BadSample(f"undecodable_{what}", f"size {width}x{height}")
    if width * height > MAX_PIXELS:
        raise BadSample(f"{what}_too_large", f"{width}x{height} pixels, more than {MAX_PIXELS:,}")
    if max(width / height, height / width) > MAX_ASPECT:
        raise BadSample(f"{what}_aspect_ratio", f"{width}x{height}, more than {MAX_ASPECT:g} to 1")


def decode_text(data: bytes | None, what: str = "txt") -> str:
    if data is None:
        raise BadSample("missing_member", f"no {what} member")
    try:
        text = data.decode("utf-8").replace("\x00", "").strip()  # NUL padding is no text
    except UnicodeDecodeError as e:
        raise BadSample("undecodable_text", str(e)) from None
    if not text:
        raise BadSample("empty_caption" if what == "txt" else "empty_text", f"empty {what}")
    return text


def _rgb(image):
    """RGB of any Pillow mode: 16- and 32-bit grey scaled to 8 bits (not clipped to white), palettes and
    transparency composited onto white."""
    from PIL import Image

    if image.mode.startswith("I"):  # I;16* (16-bit PNG, TIFF) and I (32-bit integers, 0..65535 from 16-bit PNG)
        grey = np.asarray(image).astype(np.float32) / 257.0
        image = Image.fromarray(grey.clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("P", "PA") or "A" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _image_tensor(image, size: int) -> torch.Tensor:
    """The central square resized to `size`: (3, size, size) uint8. The model's front-end normalises, so
    batches cross processes and reach the device at a quarter of float32's bytes."""
    from PIL import Image

    image = _rgb(image)
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side), reducing_gap=3.0)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_image(data: bytes, cfg: MediaConfig) -> torch.Tensor:
    """The first frame of any image Pillow reads (JPEG, PNG, WebP, GIF, ...), turned by its EXIF orientation."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # the size is checked here, below Pillow's own bomb limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            _check_size(*image.size, "image")
            image.draft("RGB", (cfg.image_size, cfg.image_size))  # JPEG: decode at 1/2..1/8 scale, still covering it
            image.load()
            return _image_tensor(ImageOps.exif_transpose(image), cfg.image_size)
    except UnidentifiedImageError:
        raise BadSample("undecodable_image",
                        f"not an image Pillow reads ({len(data)} bytes starting {data[:12]!r})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
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
    """Band-limited resampling of a mono waveform (windowed sinc, as in torchaudio's default). The rate ratio
    is taken as the nearest fraction with a denominator of at most 1000, which is exact for every common rate
    and keeps the filter bank small for odd ones (44101 Hz: a pitch error of 0.0006%)."""
    ratio = Fraction(new, orig).limit_denominator(1000)
    orig, new = ratio.denominator, ratio.numerator
    if orig == new:
        return wave
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
    """Log-mel frames of the first `max_audio_frames` of any audio soundfile reads (WAV, FLAC, MP3, Ogg), or
    else PyAV (AAC/M4A, Opus, audio in MP4 or MOV); only as much is decoded as those frames need."""
    seconds = (cfg.max_audio_frames * cfg.hop_length + cfg.n_fft) / cfg.sample_rate
    try:
        wave, rate = _read_soundfile(data, seconds)
    except BadSample as soundfile_error:
        try:
            wave, rate = _read_av_audio(data, seconds, cfg.sample_rate)
        except BadSample as av_error:
            raise BadSample("undecodable_audio",
                            f"soundfile: {soundfile_error.detail}; PyAV: {av_error.detail}") from None
    if wave.numel() < cfg.n_fft * rate / cfg.sample_rate:
        raise BadSample("undecodable_audio", f"only {wave.numel()} samples at {rate} Hz")
    return log_mel(resample(wave, rate, cfg.sample_rate), cfg)


def _read_soundfile(data: bytes, seconds: float) -> tuple[torch.Tensor, int]:
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            rate = f.samplerate
            if not 1000 <= rate <= 768_000:
                raise BadSample("undecodable_audio", f"sample rate {rate} Hz")
            wave = f.read(frames=math.ceil(seconds * rate) + 1, dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, TypeError, soundfile.LibsndfileError) as e:
        raise BadSample("undecodable_audio", f"{type(e).__name__}: {e}") from None
    return torch.from_numpy(wave).mean(dim=1), rate


def _read_av_audio(data: bytes, seconds: float, rate: int) -> tuple[torch.Tensor, int]:
    """The first `seconds` of the first audio stream, decoded and resampled to mono `rate` by FFmpeg."""
    import av

    needed, chunks = math.ceil(seconds * rate), []
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise BadSample("undecodable_audio", f"no audio stream in the {container.format.name} container")
            stream = container.streams.audio[0]
            stream.thread_count = 1
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(stream):
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
                if sum(map(len, chunks)) >= needed:
                    break
            else:
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except av.error.InvalidDataError:
        raise BadSample("undecodable_audio",
                        f"not audio FFmpeg reads ({len(data)} bytes starting {data[:12]!r})") from None
    except (av.error.FFmpegError, ValueError, IndexError) as e:
        raise BadSample("undecodable_audio", f"{type(e).__name__}: {e}") from None
    if not chunks:
        raise BadSample("undecodable_audio", "no audio frames")
    return torch.from_numpy(np.concatenate(chunks)[:needed].copy()), rate


_IMAGE_CONTAINERS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe")


SEEK_FROM = 600
"""Clips with more frames than this are sampled by seeking (where the container allows): each sampled
frame is reached from the keyframe before it, so decoding costs a few GOPs, not the whole clip."""
_SEEKABLE = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")


def decode_video(data: bytes, cfg: MediaConfig) -> torch.Tensor:
    """(num_frames, 3, size, size): frames sampled evenly over the clip (MP4, MOV, WebM, MKV, AVI, GIF...).
    Each frame is shrunk as soon as it is decoded and only the sampled ones are kept; frames are picked
    from the stream's frame count (or its duration). Long clips in seekable containers are sampled by
    seeking; others are decoded in order up to the last sampled frame."""
    import av

    def shrink(frame):  # converted on one thread (swscale's default is one per core): a loader worker is one core
        return _image_tensor(frame.reformat(format="rgb24", threads=1).to_image(), cfg.image_size)

    try:
        with av.open(io.BytesIO(data)) as container:
            stream, total = _video_stream(container)
            frames = None
            if total > SEEK_FROM and container.format.name in _SEEKABLE:
                frames = _seek_frames(container, stream, total, cfg.num_frames, shrink)
        if frames is None:
            with av.open(io.BytesIO(data)) as container:
                stream, total = _video_stream(container)
                frames = _sample_frames(container.decode(stream), total, cfg.num_frames, shrink)
    except av.error.InvalidDataError:
        raise BadSample("undecodable_video",
                        f"not a video FFmpeg reads ({len(data)} bytes starting {data[:12]!r})") from None
    except (av.error.FFmpegError, ValueError, IndexError, OSError) as e:
        raise BadSample("undecodable_video", f"{type(e).__name__}: {e}") from None
    if not frames:
        raise BadSample("undecodable_video", "no frames")
    return torch.stack(frames)


def _video_stream(container):
    """The first video stream, checked, and its frame count (from the header, else its duration)."""
    if container.format.name in _IMAGE_CONTAINERS or not container.streams.video:
        raise BadSample("undecodable_video", f"no video stream (a {container.format.name} file)")
    stream = container.streams.video[0]
    stream.thread_count = 1  # a loader worker is one core: FFmpeg's own threads would oversubscribe
    _check_size(stream.codec_context.width, stream.codec_context.height, "video")
    total = stream.frames
    if not total and stream.duration and stream.average_rate:
        total = int(stream.duration * stream.time_base * stream.average_rate)
    return stream, total


def _seek_frames(container, stream, total: int, n: int, shrink) -> list[torch.Tensor] | None:
    """The frames at `n` evenly spaced indices, each reached by seeking to the keyframe before it and
    decoding forward; None when the stream's timing does not allow it (the caller decodes in order)."""
    import itertools

    if not stream.average_rate or not stream.time_base:
        return None
    start, step = stream.start_time or 0, 1 / (stream.average_rate * stream.time_base)  # pts per frame
    out = []
    for index in np.linspace(0, total - 1, n).round().astype(int):
        target = start + int(index * step)
        container.seek(target, stream=stream, backward=True)
        frames = itertools.islice(container.decode(stream), MAX_VIDEO_FRAMES)
        frame = next((f for f in frames if f.pts is not None and f.pts >= target - step / 2), None)
        if frame is None:
            return None
        out.append(shrink(frame))
    return out


def _sample_frames(frames, total: int, n: int, shrink) -> list[torch.Tensor]:
    """`n` frames evenly spaced over the stream, each shrunk when decoded. With a frame count, those at the
    evenly spaced indices (decoding stops after the last); without one, or where the count was wrong, every
    stride-th frame is kept, the stride doubling whenever more than 2n are held, and n picked from them."""
    wanted = set(np.linspace(0, total - 1, n).round().astype(int).tolist()) if total else set()
    kept, stride = {}, 1
    for i, frame in enumerate(frames):
        if i >= MAX_VIDEO_FRAMES:
            break
        if i in wanted or (not wanted and i % stride == 0):
            kept[i] = shrink(frame)
        if wanted and i >= max(wanted):
            break
        if not wanted and len(kept) > 2 * n:
            stride *= 2
            kept = {j: t for j, t in kept.items() if j % stride == 0}
    order = sorted(kept)
    if not order:
        return []
    return [kept[order[j]] for j in np.linspace(0, len(order) - 1, n).round().astype(int)]


def decode_fields(data: bytes | None) -> dict:
    """A sample's `json` member: the object of named fields it describes the sample with."""
    if data is None:
        raise BadSample("missing_member", "no json member")
    try:
        fields = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadSample("undecodable_json", str(e)) from None
    if not isinstance(fields, dict):
        raise BadSample("undecodable_json", f"the json member is a {type(fields).__name__}, not an object")
    return fields


def decode_sample(sample: dict, modality: str, cfg: MediaConfig, fields: bool = False) -> dict:
    """Raw members -> {"key", "text"/"code"/media tensor, "caption"} for one sample of `modality`; with
    `fields`, also "fields": its `json` member's object (`decode_fields`)."""
    out = {"key": sample["__key__"]}
    if fields:
        out["fields"] = decode_fields(sample.get("json"))
    if modality == "text":
        out["text"] = decode_text(sample.get("txt"), "text")
        return out
    media = _media_member(sample, modality)
    out["caption"] = decode_text(sample.get("txt"))
    if modality == "code":
        out["code"] = decode_text(media, "code")
        return out
    decode, field = {"image": (decode_image, "pixel_values"), "audio": (decode_audio, "input_features"),
                     "video": (decode_video, "pixel_values_videos")}[modality]
    try:
        out[field] = decode(media, cfg)
    except BadSample:
        raise
    except MemoryError:
        raise BadSample("out_of_memory", f"decoding the {modality}") from None
    except Exception as e:  # a crafted file can break a decoder anywhere: it costs this sample, not the run
        raise BadSample(f"undecodable_{modality}", f"{type(e).__name__} in the decoder: {e}") from None
    return out
