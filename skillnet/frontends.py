"""Modality front-ends: each turns raw model inputs into (embeddings, attention mask) for the shared trunk.

Text and code share the token embedding (one tokenizer); image, audio and video start with a learned
[CLS] embedding so that position 0 pools every modality the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check(name: str, x: torch.Tensor, dims: int, floating: bool, shape_hint: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have shape {shape_hint}, got {tuple(x.shape)}")
    if floating != x.is_floating_point():
        kind = "a floating-point" if floating else "an integer"
        raise TypeError(f"{name} must be {kind} tensor, got {x.dtype}")


def _pixels(name: str, x: torch.Tensor, dims: int, shape_hint: str, config, dtype: torch.dtype) -> torch.Tensor:
    """Pixels as the data pipeline sends them (uint8, 0-255: 4x less to move between processes and to the
    device) are normalised here with the config's mean and std; float pixels are taken as normalised."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.uint8:
        _check(name, x, dims, False, shape_hint)
        shape = (1,) * (dims - 3) + (-1, 1, 1)
        mean = torch.tensor(config.image_mean, device=x.device, dtype=dtype).view(shape)
        std = torch.tensor(config.image_std, device=x.device, dtype=dtype).view(shape)
        return (x.to(dtype) / 255.0 - mean) / std
    _check(name, x, dims, True, shape_hint)
    return x.to(dtype)


class TextEmbedding(nn.Module):
    """Token + position + segment embeddings (BERT's), for text and code."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_offset: int = 0):
        _check("input_ids", input_ids, 2, False, "(batch, tokens)")
        b, n = input_ids.shape
        vocab, max_len = self.word_embeddings.num_embeddings, self.position_embeddings.num_embeddings
        if n + position_offset > max_len:
            raise ValueError(f"sequence of {n + position_offset} tokens exceeds max_position_embeddings={max_len}")
        # a data-dependent check, made where reading the ids back is free (on an accelerator it would stop the
        # host until the device caught up; there an id out of range fails in the embedding's kernel), and
        # left out of compiled and exported graphs
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling() and input_ids.numel() and (
                int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(position_offset, position_offset + n, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return x, attention_mask


class ImageEmbedding(nn.Module):
    """Non-overlapping square patches (a strided convolution), a [CLS] embedding and learned positions."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.image_size, self.channels = config.image_size, config.num_channels
        self.patch = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)
        num_patches = (config.image_size // config.patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Embedding(num_patches + 1, config.hidden_size)

    def forward(self, pixel_values):
        pixels = _pixels("pixel_values", pixel_values, 4, "(batch, channels, height, width)", self.config,
                         self.patch.weight.dtype)
        b, c, h, w = pixels.shape
        if (c, h, w) != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be (batch, {self.channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(pixels.shape)}")
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        positions = torch.arange(x.shape[1] + 1, device=x.device)
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.position_embeddings(positions)
        return x, torch.ones(b, x.shape[1], dtype=torch.long, device=x.device)


class AudioEmbedding(nn.Module):
    """Log-mel frames -> two stride-2 convolutions (4x fewer frames), a [CLS] embedding and positions."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.num_mel_bins = config.num_mel_bins
        self.max_frames = config.max_audio_frames
        self.conv1 = nn.Conv1d(config.num_mel_bins, h, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv1d(h, h, kernel_size=3, stride=2, padding=1)
        self.cls = nn.Parameter(torch.zeros(1, 1, h))
        self.position_embeddings = nn.Embedding(self.subsampled(self.max_frames) + 1, h)

    @staticmethod
    def subsampled(frames):
        """Frames left after the two stride-2 convolutions (works on ints and tensors)."""
        for _ in range(2):
            frames = (frames - 1) // 2 + 1
        return frames

    def forward(self, input_features, feature_attention_mask=None):
        _check("input_features", input_features, 3, True, "(batch, mel bins, frames)")
        b, mels, frames = input_features.shape
        if mels != self.num_mel_bins:
            raise ValueError(f"input_features has {mels} mel bins, the config says num_mel_bins={self.num_mel_bins}")
        if frames > self.max_frames:
            raise ValueError(f"input_features has {frames} frames, more than max_audio_frames={self.max_frames}")
        x = F.gelu(self.conv2(F.gelu(self.conv1(input_features.to(self.conv1.weight.dtype))))).transpose(1, 2)
        n = x.shape[1]
        x = (torch.cat([self.cls.expand(b, -1, -1), x], dim=1)
             + self.position_embeddings(torch.arange(n + 1, device=x.device)))
        if feature_attention_mask is None:
            mask = torch.ones(b, n + 1, dtype=torch.long, device=x.device)
        else:
            if feature_attention_mask.shape != (b, frames):
                raise ValueError(f"feature_attention_mask must be (batch, frames) = {(b, frames)}, "
                                 f"got {tuple(feature_attention_mask.shape)}")
            lengths = self.subsampled(feature_attention_mask.long().sum(-1))
            mask = (torch.arange(n + 1, device=x.device)[None, :] <= lengths[:, None]).long()
        return x, mask


class VideoEmbedding(nn.Module):
    """Tubelets (frames x patch x patch, a strided 3-D convolution) with separate space and time
    positions, and a [CLS] embedding."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.frames, self.image_size, self.channels = config.num_frames, config.image_size, config.num_channels
        t, p = config.tubelet_size, config.patch_size
        self.tubelet = nn.Conv3d(config.num_channels, h, kernel_size=(t, p, p), stride=(t, p, p))
        self.cls = nn.Parameter(torch.zeros(1, 1, h))
        self.space_embeddings = nn.Embedding((config.image_size // p) ** 2, h)
        self.time_embeddings = nn.Embedding(config.num_frames // t, h)

    def forward(self, pixel_values_videos):
        pixels = _pixels("pixel_values_videos", pixel_values_videos, 5, "(batch, frames, channels, height, width)",
                         self.config, self.tubelet.weight.dtype)
        b, t, c, h, w = pixels.shape
        want = (self.frames, self.channels, self.image_size, self.image_size)
        if (t, c, h, w) != want:
            raise ValueError(f"pixel_values_videos must be (batch, {', '.join(map(str, want))}), "
                             f"got {tuple(pixels.shape)}")
        x = self.tubelet(pixels.transpose(1, 2))  # (b, h, t', h', w')
        x = x.flatten(3).permute(0, 2, 3, 1)  # (b, t', space, hidden)
        space = self.space_embeddings(torch.arange(x.shape[2], device=x.device))
        time = self.time_embeddings(torch.arange(x.shape[1], device=x.device))
        x = x + space[None, None] + time[None, :, None]
        x = torch.cat([self.cls.expand(b, -1, -1), x.flatten(1, 2)], dim=1)
        return x, torch.ones(b, x.shape[1], dtype=torch.long, device=x.device)


FRONTENDS = {"text": TextEmbedding, "image": ImageEmbedding, "audio": AudioEmbedding, "video": VideoEmbedding}
INPUT_NAMES = {"image": "pixel_values", "audio": "input_features", "video": "pixel_values_videos"}
