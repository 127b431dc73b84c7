"""Write a small, deterministic, learnable corpus of real media files with captions that describe them.

    python -m data_pipeline.sample_corpus --out data/sample [--seed 0] [--images 240 --audio 120 ...]

Images (JPEG and PNG) of coloured shapes at named positions; audio (WAV and FLAC, mono and stereo, at
16 and 22.05 kHz) of tones, chords and rhythms; H.264 MP4 videos of a shape moving in a direction; Python
standard-library functions paired with their docstrings; text paragraphs from the standard library's
documentation. Each modality goes through `write_shards` into `OUT/<modality>/`. Image, audio and video
samples also hold a `json` member with what was drawn or played (an image's shape, colour, size, position
and box in pixels; a sound's kind and pitch, chord quality or count of beeps; a video's shape, colour and
motion), the fields of instruction templates (`skillnet.instructions`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import io
import json
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np

from .writer import write_shards

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"on the left": (0.25, 0.5), "on the right": (0.75, 0.5), "at the top": (0.5, 0.25),
             "at the bottom": (0.5, 0.75), "in the centre": (0.5, 0.5)}
MOTIONS = {"from left to right": ((0.2, 0.5), (0.8, 0.5)), "from right to left": ((0.8, 0.5), (0.2, 0.5)),
           "from top to bottom": ((0.5, 0.2), (0.5, 0.8)), "from bottom to top": ((0.5, 0.8), (0.5, 0.2))}
STDLIB = ("json", "textwrap", "string", "shlex", "fnmatch", "difflib", "heapq", "bisect", "statistics", "calendar",
          "colorsys", "base64", "html", "ipaddress", "glob", "posixpath", "copy", "random", "csv", "functools",
          "pprint", "argparse", "tarfile", "zipfile", "datetime", "fractions", "decimal", "email.utils", "urllib.parse",
          "shutil", "tempfile", "inspect", "ast", "dataclasses", "enum", "logging", "pathlib", "re", "subprocess",
          "threading", "uuid", "gettext", "locale", "mimetypes", "optparse", "platform", "quopri", "tokenize",
          "traceback", "warnings", "codecs", "contextlib", "doctest", "filecmp", "fileinput", "getopt", "gzip",
          "hmac", "linecache", "mailbox", "pickletools", "pkgutil", "plistlib", "pydoc", "queue", "reprlib",
          "runpy", "site", "socket", "ssl", "sysconfig", "tabnanny", "trace", "types", "typing", "unittest.case",
          "urllib.request", "wave", "webbrowser", "xml.dom.minidom", "zipapp", "imaplib", "poplib", "smtplib")


def _draw_shape(draw, shape: str, centre: tuple[float, float], radius: float, colour) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    elif shape == "square":
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), fill=colour)
    else:
        draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=colour)


def _canvas(rng: np.random.Generator, size: int):
    from PIL import Image

    noise = rng.integers(20, 60, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(noise)


def images(n: int, rng: np.random.Generator, size: int = 64) -> Iterator[dict]:
    from PIL import ImageDraw

    for i in range(n):
        shape, colour, place = SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(5)], list(POSITIONS)[rng.integers(5)]
        big = bool(rng.integers(2))
        image = _canvas(rng, size)
        fx, fy = POSITIONS[place]
        _draw_shape(ImageDraw.Draw(image), shape, (fx * size, fy * size), size * (0.18 if big else 0.1),
                    COLOURS[colour])
        buf = io.BytesIO()
        ext = "jpg" if i % 2 == 0 else "png"
        image.save(buf, format="JPEG" if ext == "jpg" else "PNG", quality=90)
        caption = f"a {'large' if big else 'small'} {colour} {shape} {place}"
        r = size * (0.18 if big else 0.1)
        box = [round(fx * size - r, 1), round(fy * size - r, 1), round(fx * size + r, 1), round(fy * size + r, 1)]
        fields = {"shape": shape, "colour": colour, "size": "large" if big else "small", "position": place,
                  "box": box, "width": size, "height": size}
        yield {"__key__": f"image{i:06d}", ext: buf.getvalue(), "txt": caption, "json": json.dumps(fields)}


NOTES = {"low": 220.0, "middle": 440.0, "high": 880.0}
CHORDS = {"major": (1.0, 5 / 4, 3 / 2), "minor": (1.0, 6 / 5, 3 / 2)}
COUNTS = {2: "two", 3: "three", 4: "four"}


def audio(n: int, rng: np.random.Generator) -> Iterator[dict]:
    import soundfile

    for i in range(n):
        rate = 16_000 if i % 2 == 0 else 22_050
        t = np.arange(rate) / rate
        kind = ("tone", "chord", "rhythm")[rng.integers(3)]
        if kind == "tone":
            pitch = list(NOTES)[rng.integers(3)]
            wave = np.sin(2 * np.pi * NOTES[pitch] * t)
            caption, fields = f"a steady {pitch} tone", {"kind": kind, "pitch": pitch}
        elif kind == "chord":
            quality = list(CHORDS)[rng.integers(2)]
            root = (220.0, 330.0)[rng.integers(2)]
            wave = sum(np.sin(2 * np.pi * root * r * t) for r in CHORDS[quality]) / 3
            caption, fields = f"a {quality} chord", {"kind": kind, "quality": quality}
        else:
            count = int(rng.integers(2, 5))
            gate = (np.floor(t * count * 2) % 2 == 0).astype(float)
            wave = np.sin(2 * np.pi * 660.0 * t) * gate
            caption, fields = f"{COUNTS[count]} short beeps", {"kind": "beeps", "count": COUNTS[count]}
        wave = 0.5 * wave + 0.01 * rng.standard_normal(t.shape)
        channels = np.stack([wave, wave * 0.8], axis=1) if i % 3 == 0 else wave
        buf = io.BytesIO()
        ext = "wav" if i % 4 < 2 else "flac"
        soundfile.write(buf, channels.astype(np.float32), rate, format=ext.upper(), subtype="PCM_16")
        yield {"__key__": f"audio{i:06d}", ext: buf.getvalue(), "txt": caption, "json": json.dumps(fields)}


def videos(n: int, rng: np.random.Generator, size: int = 64, frames: int = 8) -> Iterator[dict]:
    import av
    from PIL import ImageDraw

    for i in range(n):
        shape, colour, motion = SHAPES[rng.integers(3)], list(COLOURS)[rng.integers(5)], list(MOTIONS)[rng.integers(4)]
        (x0, y0), (x1, y1) = MOTIONS[motion]
        background = _canvas(rng, size)
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            stream.codec_context.thread_count = 1  # bit-identical output for a seed; and no lookahead, whose own
            # thread makes frame decisions that depend on how far ahead it got (seen under load)
            stream.options = {"crf": "20", "preset": "veryfast", "x264-params": "rc-lookahead=0:sync-lookahead=0"}
            for f in range(frames):
                a = f / (frames - 1)
                image = background.copy()
                _draw_shape(ImageDraw.Draw(image), shape, ((x0 + a * (x1 - x0)) * size, (y0 + a * (y1 - y0)) * size),
                            size * 0.12, COLOURS[colour])
                frame = av.VideoFrame.from_image(image).reformat(format="yuv420p")
                frame.pts = f
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        fields = {"shape": shape, "colour": colour, "motion": motion}
        yield {"__key__": f"video{i:06d}", "mp4": buf.getvalue(), "txt": f"a {colour} {shape} moves {motion}",
               "json": json.dumps(fields)}


def _documented_functions() -> Iterator[tuple[str, str, str]]:
    """(qualified name, source without its docstring, first paragraph of the docstring), in a fixed order."""
    for module_name in STDLIB:
        module = importlib.import_module(module_name)
        for name, fn in sorted(vars(module).items()):
            if not inspect.isfunction(fn) or fn.__module__ != module.__name__ or name.startswith("_"):
                continue
            doc = inspect.getdoc(fn)
            try:
                source = textwrap.dedent(inspect.getsource(fn))
            except (OSError, TypeError):
                continue
            if not doc or len(source) > 4000:
                continue
            raw = fn.__doc__
            body = source.replace(f'"""{raw}"""', "").replace(f"'''{raw}'''", "").replace(f'r"""{raw}"""', "")
            summary = doc.split("\n\n")[0].replace("\n", " ").strip()
            if len(summary) > 8 and body != source:
                yield f"{module_name}.{name}", body, summary


def code(n: int) -> Iterator[dict]:
    for i, (name, body, summary) in enumerate(_documented_functions()):
        if i >= n:
            return
        yield {"__key__": f"code{i:06d}", "py": body, "txt": summary, "json": f'{{"name": "{name}"}}'}


def paragraphs() -> Iterator[str]:
    for module_name in STDLIB:
        module = importlib.import_module(module_name)
        docs = [inspect.getdoc(module) or ""] + [inspect.getdoc(o) or "" for _, o in sorted(vars(module).items())
                                                 if inspect.isclass(o) and o.__module__ == module.__name__]
        for doc in docs:
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if para.count(". ") >= 1 and len(para) > 80 and not para.startswith((">>>", "..")):
                    yield para


def text(n: int) -> Iterator[dict]:
    for i, para in enumerate(paragraphs()):
        if i >= n:
            return
        yield {"__key__": f"text{i:06d}", "txt": para}


def write_corpus(out: str | Path, seed: int = 0, images_n: int = 240, audio_n: int = 120, video_n: int = 60,
                 code_n: int = 200, text_n: int = 400, max_samples: int = 40, progress: bool = True,
                 image_size: int = 64, video_size: int = 64) -> dict:
    """Write every modality under `out`; returns {modality: ShardIndex}."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    streams = {"image": images(images_n, rng, image_size), "audio": audio(audio_n, rng),
               "video": videos(video_n, rng, video_size),
               "code": code(code_n), "text": text(text_n)}
    return {m: write_shards(s, out / m, m, m, max_samples=max_samples, progress=progress)
            for m, s in streams.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.sample_corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--audio", type=int, default=120)
    parser.add_argument("--video", type=int, default=60)
    parser.add_argument("--code", type=int, default=200)
    parser.add_argument("--text", type=int, default=400)
    parser.add_argument("--max-samples", type=int, default=40, help="samples per shard")
    parser.add_argument("--image-size", type=int, default=64, help="pixels per side of the images")
    parser.add_argument("--video-size", type=int, default=64, help="pixels per side of the video frames")
    args = parser.parse_args(argv)
    indexes = write_corpus(args.out, args.seed, args.images, args.audio, args.video, args.code, args.text,
                           args.max_samples, image_size=args.image_size, video_size=args.video_size)
    for modality, index in indexes.items():
        print(f"{modality:<6} {index.samples:>5} samples in {len(index.shards)} shards: {Path(args.out) / modality}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
