"""Tasks as instructions (OFA): a template says, in words, what a task asks of its inputs, and what its target
is. Every task is then "inputs plus an instruction in, text out" for the encoder-decoder.

A template is one line with slots `[KIND:field]` for a sample's fields, inputs before `->`, the target after:

    [IMAGE:image] what does the image describe? -> [TEXT:caption]
    can text1 " [TEXT:premise] " imply text2 " [TEXT:hypothesis] "? -> [TEXT:label, closed: yes|maybe|no]
    [IMAGE:image] which region does the text " [TEXT:text] " describe? -> [BOX:region]

KIND is TEXT, CODE or BOX (written into the instruction) or IMAGE, AUDIO, VIDEO (read by the encoder's
front-ends, in order, before the instruction's text). The target is TEXT, optionally a closed set of answers
(`closed: a|b|c`: decoding may only emit one of them, scored by exact match), or BOX. Boxes are written as
four location tokens (`<bin_0>` .. `<bin_999>`: x0, y0, x1, y1 quantised into 1000 bins of the image's
width and height, OFA's scheme), which `add_location_tokens` adds to a tokenizer and its model; a box is in
pixels of the image whose size the sample's `width` and `height` fields give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BINS = 1000
INSERTED = ("TEXT", "CODE", "BOX")  # written into the instruction's text
MEDIA = ("IMAGE", "AUDIO", "VIDEO")  # read by the encoder's front-ends
SLOT = re.compile(r"\[([A-Za-z]+):([^\]]*)\]")
TEMPLATES = Path(__file__).parent / "templates" / "ofa.yaml"


def location_tokens(bins: int = BINS) -> list[str]:
    """The tokens a box is written with, to add to a tokenizer (`tokenizer.add_tokens`)."""
    return [f"<bin_{i}>" for i in range(bins)]


def quantize_box(box, width: float, height: float, bins: int = BINS) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) in pixels of an image `width` x `height` -> four bins in [0, bins)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"box {list(box)} is not inside the {width:g} x {height:g} image (x0 <= x1, y0 <= y1)")
    return tuple(min(bins - 1, int(v / size * bins)) for v, size in ((x0, width), (y0, height), (x1, width),
                                                                       (y1, height)))


def dequantize_box(bins4, width: float, height: float, bins: int = BINS) -> tuple[float, float, float, float]:
    """Four bins -> the box in pixels (each coordinate at its bin's centre)."""
    return tuple((b + 0.5) / bins * size for b, size in zip(bins4, (width, height, width, height)))


def box_iou(a, b) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else float(a == b)


def add_location_tokens(tokenizer, model=None) -> int:
    """Add the location tokens to `tokenizer` (where it lacks them) and grow `model`'s token embeddings (and
    the output projection tied to them) to the tokenizer's size; returns how many tokens were added."""
    added = tokenizer.add_tokens([t for t in location_tokens() if t not in tokenizer.get_vocab()])
    if model is not None and len(tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return added


def box_text(box, width: float, height: float) -> str:
    return "".join(f"<bin_{b}>" for b in quantize_box(box, width, height))


def read_box(text: str, width: float, height: float) -> tuple[float, float, float, float]:
    found = re.findall(r"<bin_(\d+)>", text)
    if len(found) != 4:
        raise ValueError(f"{text!r} does not hold four location tokens")
    return dequantize_box([int(b) for b in found], width, height)


@dataclass(frozen=True)
class Slot:
    kind: str  # one of INSERTED or MEDIA
    field: str  # the sample's field
    closed: tuple[str, ...] = ()  # a closed target's answers

    def __str__(self) -> str:
        return f"[{self.kind}:{self.field}" + (f", closed: {'|'.join(self.closed)}" if self.closed else "") + "]"


@dataclass(frozen=True)
class Template:
    """A parsed template: the input side's pieces (literal text and slots, in order) and the target slot."""
    name: str
    line: str  # as written
    pieces: tuple
    target: Slot

    @classmethod
    def parse(cls, name: str, text: str) -> Template:
        def fail(why: str):
            raise ValueError(f"instruction template {name!r}: {why} (in {text!r})")

        if text.count("->") != 1:
            fail("needs one '->' between the inputs and the target")
        inputs, target = text.split("->")
        pieces, at = [], 0
        for match in SLOT.finditer(inputs):
            if inputs[at:match.start()]:
                pieces.append(inputs[at:match.start()])
            pieces.append(_slot(match, fail))
            at = match.end()
        if inputs[at:]:
            pieces.append(inputs[at:])
        if any("[" in p or "]" in p for p in pieces if isinstance(p, str)):
            fail("a '[' or ']' that is not a slot [KIND:field]")
        slots = [p for p in pieces if isinstance(p, Slot)]
        if not slots:
            fail("no input slot")
        if any(s.closed for s in slots):
            fail("only the target may be a closed set")
        fields = [s.field for s in slots]
        matches = list(SLOT.finditer(target))
        if len(matches) != 1 or target.strip() != matches[0].group(0):
            fail("the target must be one slot and nothing else")
        out = _slot(matches[0], fail)
        if out.kind not in ("TEXT", "BOX"):
            fail(f"the target is TEXT or BOX, not {out.kind}")
        fields.append(out.field)
        if len(set(fields)) != len(fields):
            fail("a field used twice")
        for a, b in zip(pieces, pieces[1:]):
            if isinstance(a, Slot) and isinstance(b, Slot) and a.kind in INSERTED and b.kind in INSERTED:
                fail(f"slots {a} and {b} need text between them to be read back apart")
        return cls(name, text, tuple(pieces), out)

    @property
    def media(self) -> list[Slot]:
        """The slots the encoder's front-ends read, in order."""
        return [p for p in self.pieces if isinstance(p, Slot) and p.kind in MEDIA]

    @property
    def boxes(self) -> list[Slot]:
        """The BOX slots, the target's among them."""
        return [p for p in (*self.pieces, self.target) if isinstance(p, Slot) and p.kind == "BOX"]

    @property
    def fields(self) -> list[str]:
        return [p.field for p in self.pieces if isinstance(p, Slot)] + [self.target.field]

    def check(self, sample: dict, key: str | None = None) -> None:
        """One line naming the template and the sample when a field is missing or a closed target is not an
        answer of the set."""
        name = f"sample {key}" if key is not None else "the sample"
        missing = [f for f in self.fields if sample.get(f) is None]
        if missing:
            raise ValueError(f"{name} lacks {', '.join(missing)} for instruction template {self.name!r}")
        answer = sample[self.target.field]
        if self.target.closed and answer not in self.target.closed:
            raise ValueError(f"{name}: {answer!r} is not one of the answers of template {self.name!r} "
                             f"{list(self.target.closed)}")
        for slot in self.boxes:
            if sample.get("width") is None or sample.get("height") is None:
                raise ValueError(f"{name} lacks width, height (the image's size) for the box of instruction "
                                 f"template {self.name!r}")
            try:
                quantize_box(sample[slot.field], sample["width"], sample["height"])
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}, field {slot.field}: {e} "
                                 f"(instruction template {self.name!r})") from None

    def instruction(self, sample: dict, size: tuple[float, float] | None = None) -> str:
        """The instruction's text: literal words with TEXT and CODE slots filled and BOX slots written as
        location tokens (`size`: the image's width and height, by default the sample's `width` and `height`);
        media slots leave no text."""
        words = []
        for piece in self.pieces:
            if isinstance(piece, str):
                words.append(piece)
            elif piece.kind == "BOX":
                words.append(box_text(sample[piece.field], *_size(size, sample, self.name)))
            elif piece.kind in INSERTED:
                words.append(str(sample[piece.field]))
        return "".join(words).strip()

    def target_text(self, sample: dict, size: tuple[float, float] | None = None) -> str:
        value = sample[self.target.field]
        return box_text(value, *_size(size, sample, self.name)) if self.target.kind == "BOX" else str(value)

    def read(self, instruction: str) -> dict[str, str]:
        """The inserted fields of an instruction's text (e.g. decoded back from token ids), as text."""
        skeleton, names = "", []
        for piece in self.pieces:
            if isinstance(piece, str):
                skeleton += piece
            elif piece.kind in INSERTED:
                skeleton += f"\0{len(names)}\0"
                names.append(piece.field)
        parts = skeleton.strip().split("\0")  # literal, slot index, literal, ...
        pattern = "".join(f"(?P<f{part}>.*?)" if i % 2 else re.escape(part) for i, part in enumerate(parts))
        match = re.fullmatch(pattern, instruction.strip(), re.DOTALL)
        if match is None:
            raise ValueError(f"{instruction!r} does not follow instruction template {self.name!r}")
        return {name: match.group(f"f{i}") for i, name in enumerate(names)}


def constraint(target: Slot, tokenizer, eos_token_id: int, prefix: int = 1):
    """`prefix_allowed_tokens_fn` for a target slot: a closed set's answers (`closed_set`), four location
    tokens for a box, or None for open text."""
    if target.kind == "BOX":
        bins = tokenizer.convert_tokens_to_ids(location_tokens())

        def allow(batch_id: int, input_ids) -> list[int]:
            return bins if len(input_ids) - prefix < 4 else [eos_token_id]
        return allow
    return closed_set(tokenizer, target.closed, eos_token_id, prefix) if target.closed else None


def closed_set(tokenizer, answers, eos_token_id: int, prefix: int = 1):
    """`prefix_allowed_tokens_fn` for `generate`: every sequence decodes to one of `answers` then ends. The
    decoder's first `prefix` positions (its start token) are not constrained."""
    trie: dict[tuple, set] = {}
    for answer in answers:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [eos_token_id]
        for i in range(len(ids)):
            trie.setdefault(tuple(ids[:i]), set()).add(ids[i])
    allowed = {k: sorted(v) for k, v in trie.items()}

    def allow(batch_id: int, input_ids) -> list[int]:
        return allowed.get(tuple(input_ids[prefix:].tolist()), [eos_token_id])

    return allow


def _slot(match, fail) -> Slot:
    kind, body = match.group(1).upper(), match.group(2)
    if kind not in INSERTED + MEDIA:
        fail(f"unknown modality {match.group(1)!r} in {match.group(0)} (one of {', '.join(INSERTED + MEDIA)})")
    field, *options = [part.strip() for part in body.split(",")]
    if not re.fullmatch(r"\w+", field):
        fail(f"slot {match.group(0)} needs a field name")
    closed = ()
    for option in options:
        key, _, value = option.partition(":")
        if key.strip() != "closed":
            fail(f"unknown slot option {key.strip()!r} in {match.group(0)} (only 'closed')")
        closed = tuple(a.strip() for a in value.split("|"))
        if not all(closed):
            fail(f"an empty answer in {match.group(0)}")
        if len(set(closed)) != len(closed):
            fail(f"duplicate answers in {match.group(0)}")
        if kind != "TEXT":
            fail(f"only a TEXT slot may be a closed set, not {match.group(0)}")
    return Slot(kind, field, closed)


def _size(size, sample, name):
    if size is not None:
        return size
    if sample.get("width") is None or sample.get("height") is None:
        raise ValueError(f"instruction template {name!r} writes a box: the sample needs the image's size "
                         f"(fields width and height)")
    return float(sample["width"]), float(sample["height"])


def resolve_template(task: str, text: str) -> Template:
    """`task`'s template: a template line, or the name of a shipped one (`load_templates()`)."""
    if "->" in text:
        return Template.parse(task, text)
    shipped = load_templates()
    if text not in shipped:
        raise ValueError(f"task {task!r}: no shipped instruction template {text!r} (one of {sorted(shipped)}, or a "
                         f"template line)")
    return shipped[text]


def load_templates(path: str | Path | None = None) -> dict[str, Template]:
    """Templates by name from a YAML file ({name: template}); the shipped ones (OFA's wording) by default."""
    import yaml

    path = Path(path) if path is not None else TEMPLATES
    tree = yaml.safe_load(path.read_text())
    if not isinstance(tree, dict) or not all(isinstance(v, str) for v in tree.values()):
        raise ValueError(f"{path}: instruction templates are a mapping of names to template lines")
    return {name: Template.parse(name, text) for name, text in tree.items()}
