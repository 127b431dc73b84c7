"""Hostile and real data, made here: a broken or crafted file costs one counted skip with bounded memory,
real files written by Pillow, soundfile and PyAV in several codecs and modes decode correctly, and data
that cannot feed a run stops it in one line, before training where it can be seen up front."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.media import BadSample, MediaConfig, decode_audio, decode_image, decode_sample, decode_video

ROOT = Path(__file__).resolve().parents[1]
MEDIA = MediaConfig(image_size=32, num_frames=4, num_mel_bins=16, max_audio_frames=256)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, "PNG")
    return out.getvalue()


def _skip_reason(decode, data: bytes) -> str:
    with pytest.raises(BadSample) as caught:
        decode(data, MEDIA)
    return caught.value.reason


def _wav(seconds: float, rate: int, freq: float = 440.0) -> bytes:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    soundfile.write(out, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="WAV")
    return out.getvalue()


def _video(codec: str, container: str, frames: int, size: tuple[int, int], rate: int = 10,
           pix_fmt: str = "yuv420p") -> bytes:
    """`frames` frames whose mean brightness counts up, so the frames a decoder picks can be told apart."""
    import av

    out = io.BytesIO()
    with av.open(out, "w", format=container) as output:
        stream = output.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        for i in range(frames):
            pixels = np.full((size[1], size[0], 3), int(255 * i / max(1, frames - 1)), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return out.getvalue()


# -- images ------------------------------------------------------------------------------------------------

def test_images_whose_header_claims_a_huge_or_extreme_size_are_refused_before_decoding():
    line = _png(np.zeros((1, 65535), dtype=np.uint8))  # 65535 x 1: a few hundred bytes
    assert len(line) < 1000 and _skip_reason(decode_image, line) == "image_aspect_ratio"
    big = Image.new("L", (13000, 13000))
    out = io.BytesIO()
    big.save(out, "PNG")
    assert _skip_reason(decode_image, out.getvalue()) == "image_too_large"
    with pytest.raises(BadSample, match=r"not an image Pillow reads \(15 bytes starting b'\\x00not"):
        decode_image(b"\x00not an image!!", MEDIA)


def test_sixteen_bit_grey_palette_transparency_and_exif_orientation():
    grey = decode_image(_png(np.full((40, 40), 32768, dtype=np.uint16)), MEDIA)  # mode I;16
    assert grey.shape == (3, 32, 32) and abs(int(grey.float().mean()) - 127) <= 1  # half grey, not white

    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 40, 20))  # top half red, bottom half index 0: transparent
    out = io.BytesIO()
    palette.save(out, "GIF", transparency=0)
    pixels = decode_image(out.getvalue(), MEDIA)
    assert pixels[:, 2, 16].tolist() == [255, 0, 0] and pixels[:, 29, 16].tolist() == [255, 255, 255]

    # a photograph taken in portrait: stored 64 wide and 32 high (left red, right blue), EXIF says turn it
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[:, :32, 0] = 255
    stored[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    out = io.BytesIO()
    Image.fromarray(stored).save(out, "JPEG", exif=exif, quality=95)
    upright = decode_image(out.getvalue(), MEDIA)
    top, bottom = upright[:, 2, 16].int(), upright[:, 29, 16].int()
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # red above, blue below


def test_large_jpeg_decoded_at_a_reduced_scale_gives_the_full_decode_picture():
    rng = np.random.default_rng(0)
    photo = np.repeat(np.repeat(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), 100, 0), 100, 1)  # 4800 x 3200
    out = io.BytesIO()
    Image.fromarray(photo).save(out, "JPEG", quality=90)
    got = decode_image(out.getvalue(), MEDIA).float()
    full = Image.open(io.BytesIO(out.getvalue())).convert("RGB").resize((32, 32), Image.BICUBIC,
                                                                         box=(800, 0, 4000, 3200))
    assert (got - torch.from_numpy(np.asarray(full).copy()).permute(2, 0, 1)).abs().mean() < 6


# -- audio -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [8000, 16001, 22050, 44101, 48000])
def test_audio_at_odd_rates_keeps_its_pitch(rate):
    mel = decode_audio(_wav(3.0, rate, freq=1000.0), MEDIA)
    assert mel.shape == (16, 256)  # trimmed to the model's frames
    assert mel.mean(1).argmax() == decode_audio(_wav(3.0, 16000, freq=1000.0), MEDIA).mean(1).argmax()


def test_audio_in_containers_soundfile_cannot_read_decodes_through_pyav():
    import av

    for codec, container in (("aac", "ipod"), ("libopus", "ogg"), ("aac", "mov")):
        out = io.BytesIO()
        with av.open(out, "w", format=container) as output:
            stream = output.add_stream(codec, rate=48000)
            stream.layout = "mono"
            t = np.arange(48000 * 3) / 48000
            wave = (0.5 * np.sin(2 * np.pi * 1000.0 * t)).astype(np.float32)
            for start in range(0, len(wave), 960):
                frame = av.AudioFrame.from_ndarray(wave[None, start:start + 960], format="flt", layout="mono")
                frame.rate = 48000
                for packet in stream.encode(frame):
                    output.mux(packet)
            for packet in stream.encode():
                output.mux(packet)
        mel = decode_audio(out.getvalue(), MEDIA)
        reference = decode_audio(_wav(3.0, 48000, freq=1000.0), MEDIA)
        assert mel.shape == (16, 256) and mel.mean(1).argmax() == reference.mean(1).argmax(), (codec, container)
    assert _skip_reason(decode_audio, b"RIFF....WAVEnot really") == "undecodable_audio"


# -- video -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("codec, container", [("libx264", "mp4"), ("hevc", "matroska"), ("libvpx-vp9", "webm"),
                                              ("libsvtav1", "mp4"), ("mpeg4", "mov"), ("gif", "gif")])
def test_video_codecs_decode_to_evenly_spaced_frames(codec, container):
    data = _video(codec, container, 30, (64, 48), pix_fmt="rgb8" if codec == "gif" else "yuv420p")
    frames = decode_video(data, MEDIA)
    assert frames.shape == (4, 3, 32, 32)
    brightness = frames.float().mean((1, 2, 3))
    assert (brightness.diff() > 40).all() and brightness[0] < 20 and brightness[-1] > 235  # first to last


def test_an_image_named_as_a_video_is_not_a_video():
    sample = {"__key__": "k", "mp4": _png(np.zeros((8, 8), dtype=np.uint8)), "txt": b"a caption"}
    with pytest.raises(BadSample, match="no video stream"):
        decode_sample(sample, "video", MEDIA)
    with pytest.raises(BadSample, match=r"not a video FFmpeg reads \(9 bytes starting b'\\x00garbage!'\)"):
        decode_video(b"\x00garbage!", MEDIA)


def test_a_decoder_crashing_in_any_way_costs_one_sample(monkeypatch):
    from data_pipeline import media

    monkeypatch.setattr(media, "decode_audio", lambda data, cfg: 1 / 0)
    with pytest.raises(BadSample) as caught:
        media.decode_sample({"__key__": "k", "wav": b"RIFF", "txt": b"a caption"}, "audio", MEDIA)
    assert caught.value.reason == "undecodable_audio" and "ZeroDivisionError in the decoder" in str(caught.value)


def test_captions_and_members_say_what_is_wrong():
    with pytest.raises(BadSample) as caught:
        decode_sample({"__key__": "k", "xyz": b"?", "txt": b"a caption"}, "audio", MEDIA)
    assert caught.value.reason == "missing_member" and "found xyz" in str(caught.value)
    with pytest.raises(BadSample) as caught:
        decode_sample({"__key__": "k", "png": _png(np.zeros((8, 8), dtype=np.uint8)), "txt": b"\x00\x00 \x00"},
                      "image", MEDIA)
    assert caught.value.reason == "empty_caption"


# -- memory ------------------------------------------------------------------------------------------------

_MEASURE = """
import json, sys
from pathlib import Path
from data_pipeline.media import BadSample, MediaConfig, decode_audio, decode_image, decode_video
decode = {"image": decode_image, "audio": decode_audio, "video": decode_video}[sys.argv[1]]
cfg = MediaConfig(image_size=224, num_frames=8)
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024
for path in (sys.argv[3], sys.argv[2]):  # a small file of the kind first: libraries loaded
    data = Path(path).read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) reset to the current size
    before = status("VmRSS")
    try:
        decode(data, cfg)
        reason = None
    except BadSample as e:
        reason = e.reason
print(json.dumps({"reason": reason, "peak_mb": status("VmHWM") - before}))
"""


def _peak(tmp_path, kind: str, data: bytes, warm: bytes) -> dict:
    (tmp_path / "in").write_bytes(data)
    (tmp_path / "warm").write_bytes(warm)
    done = subprocess.run([sys.executable, "-c", _MEASURE, kind, str(tmp_path / "in"), str(tmp_path / "warm")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hostile_files_cost_bounded_memory(tmp_path):
    """Measured in a fresh process: its peak resident memory while decoding one file, above its size before."""
    small_png = _png(np.zeros((16, 16, 3), dtype=np.uint8))
    wide = _peak(tmp_path, "image", _png(np.zeros((1, 1_000_000), dtype=np.uint8)), small_png)
    assert wide["reason"] == "image_aspect_ratio" and wide["peak_mb"] < 50
    out = io.BytesIO()
    Image.new("RGB", (7000, 5000), (200, 30, 30)).save(out, "JPEG")  # 105 MB decoded in full
    photo = _peak(tmp_path, "image", out.getvalue(), small_png)
    assert photo["reason"] is None and photo["peak_mb"] < 40  # decoded at 1/8 scale
    odd = _peak(tmp_path, "audio", _wav(60.0, 44101), _wav(1.0, 16000))  # a minute at an odd rate
    assert odd["reason"] is None and odd["peak_mb"] < 200
    # a static 1080p clip of 20 s: tiny to store, 6 MB per decoded frame
    still = _video("libx264", "mp4", 200, (1920, 1080), rate=10)
    assert len(still) < 200_000
    clip = _peak(tmp_path, "video", still, _video("libx264", "mp4", 4, (64, 48)))
    assert clip["reason"] is None and clip["peak_mb"] < 400


# -- sources that cannot feed a run -----------------------------------------------------------------------

def _shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _image_source(tmp_path: Path, shards: int, usable: bool, samples: int = 4) -> str:
    from data_pipeline.shards import ShardIndex

    png = _png(np.zeros((16, 16, 3), dtype=np.uint8)) if usable else b"\x00 broken"
    counts = {}
    for s in range(shards):
        name = f"img-{s:06d}.tar"
        _shard(tmp_path / name, [(f"k{s}_{i}.{ext}", data) for i in range(samples)
                                 for ext, data in (("png", png), ("txt", b"a caption"))])
        counts[name] = samples
    ShardIndex("image", ["png", "txt"], counts).save(tmp_path / "img.index.json")
    return str(tmp_path / f"img-{{000000..{shards - 1:06d}}}.tar")


def _loader(tokenizer, shards: str, **cfg):
    from data_pipeline.config import DataConfig
    from data_pipeline.loader import MultiTaskLoader

    world = cfg.pop("world", 1)
    config = DataConfig(tasks=[{"name": "image", "modality": "image", "sources": [{"shards": shards}]}],
                        **{"batch_size": 2, "num_workers": 0, "shuffle_buffer": 2, **cfg})
    return MultiTaskLoader(config, tokenizer, MEDIA, {"image": ["image", "generic"]}, rank=0, world_size=world)


def test_a_task_whose_samples_never_decode_stops_with_one_line(tmp_path, tokenizer, caplog):
    from data_pipeline.stream import DataError

    loader = _loader(tokenizer, _image_source(tmp_path, 2, usable=False), max_consecutive_skips=30, resample=True)
    with pytest.raises(DataError, match=r"task 'image': the last 30 samples drawn were all unusable "
                                        r"\(30 undecodable_image\) from source image\.0 \(2 shards, "
                                        r"e\.g\. .*img-00000"):
        next(iter(loader))
    logged = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(logged) == 10 and "logged every 1000th" in logged[-1].getMessage()  # not 30 lines


def test_layouts_that_cannot_feed_the_readers_are_refused_up_front(tmp_path, tokenizer):
    (tmp_path / "few").mkdir()
    few = _image_source(tmp_path / "few", 2, usable=True)
    with pytest.raises(ValueError, match=r"has 2 shards for 4 readers \(2 ranks x 2 workers\)"):
        _loader(tokenizer, few, num_workers=2, world=2)
    _loader(tokenizer, few, num_workers=2, world=2, resample=True)  # drawn with replacement: enough
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="holds no samples"):
        _loader(tokenizer, _image_source(tmp_path / "none", 1, usable=True, samples=0))


# -- shards ------------------------------------------------------------------------------------------------

def test_a_tar_cut_at_any_byte_keeps_every_sample_before_the_cut(tmp_path):
    import tarfile

    from data_pipeline.shards import SkipCounter, read_raw_samples

    members = {f"k{i}.{ext}": bytes([65 + i]) * (300 + 70 * i) for i in range(3) for ext in ("png", "txt")}
    buffer = io.BytesIO()
    ends = {}
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            ends[name.split(".")[0]] = tar.offset  # past the sample's last member so far
        archive_end = tar.offset
    whole = buffer.getvalue()
    path = tmp_path / "cut.tar"
    for cut in range(archive_end + 1024):
        path.write_bytes(whole[:cut])
        skipped = SkipCounter()
        got = list(read_raw_samples(str(path), skipped))
        complete = [k for k, end in ends.items() if end <= cut]
        keys = [s["__key__"] for s in got]
        assert keys[:len(complete)] == complete and len(keys) <= len(complete) + 1, cut
        for sample in got:  # nothing kept is damaged
            assert all(data == members[f"{sample['__key__']}.{ext}"] for ext, data in sample.items()
                       if not ext.startswith("__"))
        assert sum(skipped.values()) == (1 if cut < archive_end + 512 else 0), (cut, skipped)


def test_duplicate_keys_odd_members_are_counted_and_nothing_is_lost(tmp_path):
    from data_pipeline.shards import SkipCounter, read_raw_samples

    _shard(tmp_path / "d.tar", [("a.png", b"1"), ("a.txt", b"one"), ("README", b"?"), ("a.png", b"2"),
                                ("a.txt", b"two"), ("a.xyz", b"?")])
    skipped = SkipCounter()
    got = list(read_raw_samples(str(tmp_path / "d.tar"), skipped))
    assert [(s["__key__"], s["png"], s["txt"]) for s in got] == [("a", b"1", b"one"), ("a", b"2", b"two")]
    assert skipped == {"duplicate_key": 1, "member_without_extension": 1, "unknown_extension": 1}


# -- the writer ---------------------------------------------------------------------------------------------

def test_the_writer_checks_what_it_writes(tmp_path, capsys):
    import tarfile

    from data_pipeline.shards import ShardIndex
    from data_pipeline.write_shards import main as write_main

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    png = _png(np.full((16, 16, 3), 200, dtype=np.uint8))
    for name in ("sub/cam", "sub_cam", "chelsea.2023.01", "broken"):
        (photos / f"{name}.png").write_bytes(png if name != "broken" else b"\x00 not a png")
        (photos / f"{name}.txt").write_text(f"a photo named {name}")
    (photos / ".DS_Store.png").write_bytes(png)
    (photos / "README").write_text("these are photos")
    assert write_main(["--input", str(photos), "--modality", "image", "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr().out
    assert "wrote 3 usable samples" in said and "1 undecodable_image" in said and "1 hidden_file" in said
    assert "1 file_without_extension" in said
    with tarfile.open(tmp_path / "out" / "image-000000.tar") as tar:
        assert sorted(tar.getnames()) == sorted(f"{k}.{e}" for k in ("chelsea_2023_01", "sub/cam", "sub_cam")
                                                for e in ("png", "txt"))
    assert ShardIndex.load(tmp_path / "out" / "image.index.json").samples == 3

    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    for i in range(3):
        (uncaptioned / f"p{i}.png").write_bytes(png)
    assert write_main(["--input", str(uncaptioned), "--modality", "image", "--out", str(tmp_path / "none")]) == 2
    assert "error: no usable image sample to write (3 missing_member)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()

    (photos / "x.png").write_bytes(png)
    lines = [{"key": "../../escape", "image": "x.png", "caption": "fine"},
             {"image": "nowhere/y.png", "caption": "lost"}]
    manifest = tmp_path / "photos" / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert write_main(["--input", str(manifest), "--modality", "image", "--out", str(tmp_path / "m")]) == 2
    assert f"error: {manifest}:2: image: no file" in capsys.readouterr().err
    manifest.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"image": "x.png", "caption": None}) + "\n")
    assert write_main(["--input", str(manifest), "--modality", "image", "--out", str(tmp_path / "m")]) == 2
    assert f"error: {manifest}:2: caption is null" in capsys.readouterr().err
    import datasets

    datasets.Dataset.from_dict({"image": [str(photos / "x.png")] * 2, "caption": ["fine", None]}).to_json(
        tmp_path / "hf.jsonl")
    assert write_main(["--input", str(tmp_path / "hf.jsonl"), "--hf", "--modality", "image", "--out",
                       str(tmp_path / "h")]) == 2
    assert f"error: {tmp_path / 'hf.jsonl'}: row 1: caption is null" in capsys.readouterr().err
    manifest.write_text(json.dumps(lines[0]) + "\n")
    assert write_main(["--input", str(manifest), "--modality", "image", "--out", str(tmp_path / "m")]) == 0
    with tarfile.open(tmp_path / "m" / "image-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["escape.png", "escape.txt"]


def test_index_only_counts_usable_samples_of_the_modality(tmp_path, capsys):
    from data_pipeline.shards import ShardIndex
    from data_pipeline.write_shards import main as write_main

    laion = tmp_path / "laion"  # img2dataset's layout: 00000.tar with key.jpg / key.txt / key.json
    laion.mkdir()
    jpg = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(jpg, "JPEG")
    members = [(f"00000000{i}.{ext}", data) for i in range(3)
               for ext, data in (("jpg", jpg.getvalue()), ("txt", b"a red square"), ("json", b"{}"))]
    _shard(laion / "00000.tar", [*members, ("000000009.jpg", b"\x00broken"), ("000000009.txt", b"broken")])
    assert write_main(["--index-only", str(laion / "00000.tar"), "--modality", "image"]) == 0
    assert "indexed 3 usable image samples in 1 shards; left out 1: 1 undecodable_image" in capsys.readouterr().out
    assert ShardIndex.load(laion / "laion.index.json").shards == {"00000.tar": 3}  # visible, named after the folder

    assert write_main(["--index-only", str(laion / "00000.tar"), "--modality", "audio", "--out",
                       str(tmp_path / "idx")]) == 2
    assert "error: --index-only: no usable audio sample in 1 shards (4 missing_member)" in capsys.readouterr().err
    assert write_main(["--index-only", str(laion / "00000.tar"), "--modality", "image", "--out",
                       str(tmp_path / "idx")]) == 0
    assert (tmp_path / "idx" / "image.index.json").exists()
    for wrong in (str(tmp_path / "nothing.tar"), str(laion)):
        assert write_main(["--index-only", wrong, "--modality", "image"]) == 2
        assert "is not a shard file" in capsys.readouterr().err


def test_long_clips_are_sampled_by_seeking_to_the_same_frames(monkeypatch):
    """A clip longer than SEEK_FROM frames in a seekable container: each sampled frame is reached from its
    keyframe, and they are the frames decoding in order picks."""
    from data_pipeline import media

    data = _video("libx264", "mp4", media.SEEK_FROM + 300, (64, 48), rate=25)
    sought = decode_video(data, MEDIA)
    brightness = sought.float().mean((1, 2, 3))
    assert (brightness.diff() > 40).all() and brightness[0] < 20 and brightness[-1] > 235
    calls = []
    original = media._seek_frames
    monkeypatch.setattr(media, "_seek_frames", lambda *a: calls.append(1) or original(*a))
    assert torch.equal(decode_video(data, MEDIA), sought) and calls  # it did seek
    monkeypatch.setattr(media, "SEEK_FROM", 10**9)  # decoded in order instead
    assert torch.equal(decode_video(data, MEDIA), sought)
