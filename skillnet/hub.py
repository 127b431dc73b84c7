"""Exports that carry their code and a model card, so a model folder loads, and explains itself, anywhere.

transformers' remote code (`from_pretrained(folder, trust_remote_code=True)`) loads flat files from the
model folder: it copies a file and then the files its `from .x import` lines name, `x.py` beside it; it
knows no packages. `save_model_code` therefore writes the modules of `skillnet` the model needs as one
flat level (`skillnet/heads/base.py` -> `heads_base.py`), rewriting the package's imports to the flat
names, and points `config.json`'s `auto_map` at them. The model code reads no data files at run time (the
skill tables are Python; `configs/*.yaml` only serve `load_config`, which loading a folder never calls).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import pkgutil
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
import yaml

from . import modeling
from .configuration import SkillNetConfig
from .params import count_parameters

PACKAGE = __name__.split(".")[0]
PACKAGE_DIR = Path(__file__).parent
ROOTS = (f"{PACKAGE}.modeling", f"{PACKAGE}.configuration")
"""The modules the flat code starts from; what they import from the package comes with them."""
AUTO_CLASSES = {"AutoModel": "SkillNetModel", "AutoModelForPreTraining": "SkillNetForPreTraining",
                "AutoModelForMaskedLM": "SkillNetForMaskedLM",
                "AutoModelForSeq2SeqLM": "SkillNetForConditionalGeneration"}
"""Auto class -> the model class it loads, as `skillnet/__init__.py` registers them."""
PIPELINE_TAGS = {"SkillNetForPreTraining": "fill-mask", "SkillNetForMaskedLM": "fill-mask",
                 "SkillNetForConditionalGeneration": "text2text-generation"}
"""The Hub's pipeline tag of a text model saved as this class (a multi-task model serves several pipelines)."""


def flat_name(module: str) -> str:
    """The flat module of a package module: `skillnet.modeling` -> `modeling_skillnet` (transformers' naming,
    also for `configuration`), `skillnet.heads.base` -> `heads_base`, `skillnet.layers` -> `layers`."""
    parts = module.split(".")[1:]
    if parts in (["modeling"], ["configuration"]):
        return f"{parts[0]}_{PACKAGE}"
    return "_".join(parts)


def _source(module: str) -> Path:
    path = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _is_package(module: str) -> bool:
    return _source(module).name == "__init__.py"


def _package_imports(module: str, tree: ast.Module) -> list[tuple[ast.ImportFrom, str]]:
    """`module`'s `from ... import` statements that import from the package, each with the module it names."""
    here = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == PACKAGE for a in node.names):
            raise ValueError(f"{module}: flat code cannot hold `import {PACKAGE}...`; write `from .x import name`")
        if not isinstance(node, ast.ImportFrom):
            continue
        target = (importlib.util.resolve_name("." * node.level + (node.module or ""), here) if node.level
                  else node.module)
        if target.split(".")[0] != PACKAGE:
            continue
        if node.module is None or target == PACKAGE or not _source(target).exists():
            raise ValueError(f"{module}: line {node.lineno} imports from {target!r}, which flat code cannot name; "
                             "write `from .module import name` for a module of the package")
        found.append((node, target))
    return found


def bundled_modules() -> list[str]:
    """The package's modules the model code needs: `ROOTS` and, recursively, what they import from the
    package. A subpackage brings all its modules, as its discovery imports them all (`skillnet.heads`)."""
    needed, todo = set(), list(ROOTS)
    while todo:
        module = todo.pop()
        if module in needed:
            continue
        needed.add(module)
        parent = module.rpartition(".")[0]
        if parent != PACKAGE:  # Python runs a module's packages before it
            todo.append(parent)
        if _is_package(module):
            todo += [f"{module}.{m.name}" for m in pkgutil.iter_modules([str(_source(module).parent)])]
        todo += [target for _, target in _package_imports(module, ast.parse(_source(module).read_bytes()))]
    return sorted(needed)


def _import(node: ast.ImportFrom, target: str) -> str:
    return ast.unparse(ast.ImportFrom(module=flat_name(target), names=node.names, level=1))


def flat_module(module: str) -> str:
    """The text of `module`'s flat file. A module's imports from the package are rewritten to the flat names
    (`from ..metrics import f1` in `heads/span.py` -> `from .metrics import f1`). A subpackage becomes its
    `__init__`'s imports from the package plus `from .<module> import *` for each of its modules: the
    definitions (and registrations) its discovery would have run, in lines transformers follows."""
    source = _source(module).read_bytes()
    tree = ast.parse(source)
    imports = _package_imports(module, tree)
    header = f"# Written by {__name__}.save_model_code from {PACKAGE}/{_source(module).relative_to(PACKAGE_DIR)}.\n"
    if _is_package(module):
        named = {target for _, target in imports}
        members = sorted(f"{module}.{m.name}" for m in pkgutil.iter_modules([str(_source(module).parent)]))
        lines = [f"from .{flat_name(m)} import *  # noqa: F401,F403" for m in members if m not in named]
        lines += [_import(node, target) for node, target in imports]  # after the star imports: these names win
        lines += ["", *(ast.unparse(node) for node in tree.body if isinstance(node, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets))]
        docstring = ast.get_docstring(tree)
        return header + (f'"""{docstring}"""\n\n' if docstring else "") + "\n".join(lines) + "\n"
    # ast's columns count UTF-8 bytes: edit the bytes, from the last import up so earlier offsets hold
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    for node, target in sorted(imports, key=lambda i: (i[0].lineno, i[0].col_offset), reverse=True):
        lo, hi = starts[node.lineno - 1] + node.col_offset, starts[node.end_lineno - 1] + node.end_col_offset
        source = source[:lo] + _import(node, target).encode() + source[hi:]
    return header + source.decode()


def auto_map() -> dict[str, str]:
    """`config.json`'s `auto_map`: the flat config class and each Auto class's model class (those that exist)."""
    found = {"AutoConfig": f"{flat_name(f'{PACKAGE}.configuration')}.{SkillNetConfig.__name__}"}
    model_module = flat_name(modeling.__name__)
    return found | {auto: f"{model_module}.{name}" for auto, name in AUTO_CLASSES.items() if hasattr(modeling, name)}


def save_model_code(folder: str | Path) -> list[Path]:
    """Write the model code into `folder` (which holds `save_pretrained`'s `config.json`) as flat modules and
    add their `auto_map` to `config.json`, so `AutoModel.from_pretrained(folder, trust_remote_code=True)`
    loads where `skillnet` is not installed. The weights are left alone. Returns the files written."""
    folder = Path(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    written = []
    for module in bundled_modules():
        path = folder / f"{flat_name(module)}.py"
        path.write_text(flat_module(module))
        written.append(path)
    config["auto_map"] = auto_map()
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return written


def set_model_max_length(folder: str | Path, length: int) -> None:
    """Make the saved tokenizer truncate (`truncation=True`) to `length` tokens: what the model accepts."""
    file = Path(folder) / "tokenizer_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "model_max_length": length}, indent=2) + "\n")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_model_card(folder: str | Path, training_config: str | None = None, data: dict[str, list[str]] | None = None,
                     metrics: dict[str, dict[str, float]] | None = None, metrics_source: str = "") -> Path:
    """Write `folder/README.md`, a Hub model card generated from `folder`'s `config.json` and from the run:
    `training_config` (the resolved YAML), `data` (task -> its data files or shards) and `metrics` (a row
    -> {metric: value} table, described by `metrics_source`). Parameter counts are `skillnet.params`'s, of
    the saved class built on the meta device (no memory, no weights read)."""
    folder = Path(folder)
    config = SkillNetConfig.from_pretrained(folder)
    architecture = (config.architectures or ["SkillNetForPreTraining"])[0]
    with torch.device("meta"):
        counts = count_parameters(getattr(modeling, architecture)(config))
    text = "text" in config.modalities
    front = {"library_name": "transformers", "tags": [PACKAGE, *config.modalities]}
    if config.task_heads:
        front["tags"].append("multi-task")
    if text and architecture in PIPELINE_TAGS:
        front["pipeline_tag"] = PIPELINE_TAGS[architecture]
    registry = config.registry if config.skills else None
    layers = config.skill_layer_indices(config.num_hidden_layers)
    parts = [
        f"---\n{yaml.safe_dump(front, sort_keys=False)}---",
        f"# {folder.resolve().name}",
        f"A SkillNet model saved as `{architecture}`: a transformer whose layers hold named skills, of which each "
        f"task runs only its own (router `{config.router}`). Hidden size {config.hidden_size}, "
        f"{config.num_hidden_layers} encoder layers ({len(layers)} with skills), "
        + (f"{config.num_decoder_layers} decoder layers, " if config.num_decoder_layers else "")
        + f"{config.num_attention_heads} attention heads, vocabulary {config.vocab_size}, at most "
        f"{config.max_position_embeddings} positions; modalities: {', '.join(config.modalities)}.",
        f"**Total parameters: {counts.total:,}** (every skill, front-end and head).",
    ]
    if getattr(config, "extracted_tasks", None):
        parts.append(f"Extracted for {', '.join(f'`{t}`' for t in config.extracted_tasks)}: it holds only the skills, "
                     "heads and front-ends these tasks run, and for them gives the outputs of the model it was "
                     "extracted from.")
    if registry is not None:
        rows = [[s["name"], s.get("description", ""), f"{counts.per_skill.get(s['name'], 0):,}"] for s in config.skills]
        parts += ["## Skills", _table(["skill", "description", "parameters"], rows)]
    rows = [[task, ", ".join(registry.skill_names(task)) if registry else "-", config.task_modalities.get(task, "text"),
             config.task_heads.get(task, {}).get("type", "-"), f"{counts.per_task[task]:,}"] for task in config.tasks]
    parts += ["## Tasks", "Activated parameters: those that process one token of the task's modality (its skills, "
              "the shared layers and its modality's front-end; no heads).",
              _table(["task", "skills", "modality", "head", "activated parameters"], rows)]
    if config.default_task:
        parts.append(f"A call that names no task runs `{config.default_task}`.")
    if training_config:
        parts += ["## Training configuration", f"```yaml\n{training_config.rstrip()}\n```"]
    if data:
        parts += ["## Data", _table(["task", "data"], [[task, "<br>".join(files)] for task, files in data.items()])]
    if metrics:
        names = list(dict.fromkeys(name for row in metrics.values() for name in row))
        rows = [[row, *(_number(values[n]) if n in values else "" for n in names)] for row, values in metrics.items()]
        parts += ["## Metrics", metrics_source, _table(["", *names], rows)]
    parts += ["## Loading", _loading(folder, config, architecture)]
    card = folder / "README.md"
    card.write_text("\n\n".join(p for p in parts if p) + "\n")
    return card


def _loading(folder: Path, config: SkillNetConfig, architecture: str) -> str:
    """The card's loading section: a snippet that needs only transformers, for the saved class."""
    auto = {name.rpartition(".")[2]: cls for cls, name in auto_map().items() if cls != "AutoConfig"}.get(architecture)
    path = json.dumps(str(folder))
    if auto:
        imports = [f"from transformers import {auto}"]
        code = [f"model = {auto}.from_pretrained({path}, trust_remote_code=True)"]
    else:
        imports = ["from transformers.dynamic_module_utils import get_class_from_dynamic_module"]
        code = [f"cls = get_class_from_dynamic_module(\"{flat_name(modeling.__name__)}.{architecture}\", {path})",
                f"model = cls.from_pretrained({path})"]
    if (folder / "tokenizer_config.json").exists() and "text" in config.modalities:
        imports.append("from transformers import AutoTokenizer")
        code.append(f"tokenizer = AutoTokenizer.from_pretrained({path}, trust_remote_code=True)  "
                    "# config.json names code")
        text_tasks = [t for t in config.tasks if config.task_modalities.get(t, "text") == "text"]
        task = config.default_task if config.default_task in text_tasks else next(iter(text_tasks), None)
        if not config.task_heads and task is not None:  # a head's inputs depend on its type (`skillnet.heads`)
            code.append(f"outputs = model(**tokenizer([\"some text\"], truncation=True, return_tensors=\"pt\"), "
                        f"task={json.dumps(task)})")
    snippet = "\n".join([*imports, "", *code])
    return ("The folder carries its model code (`trust_remote_code=True`), so transformers alone loads it:\n\n"
            f"```python\n{snippet}\n```\n\n"
            f"With the `{PACKAGE}` package installed, `{PACKAGE}.{architecture}.from_pretrained({path})` loads it with "
            f"the package's code; so do the Auto classes once `import {PACKAGE}` has registered them (transformers "
            "prefers a registered class to a folder's code, with `trust_remote_code` or without).")


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
                      torch.bool: "BOOL"}


def write_safetensors(path: Path, specs: list[tuple[str, torch.Size, torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Write a safetensors file one tensor at a time: the header from `specs` (name, shape, dtype) first, then
    the data of `tensors`, which yields them by name in the order of `specs` (each tensor in memory only
    while it is written)."""
    from tqdm import tqdm

    header, position = {}, 0
    for name, shape, dtype in specs:
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [position, position + size]}
        position += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    with Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for (name, shape, dtype), (got, tensor) in tqdm(zip(specs, tensors, strict=True), total=len(specs),
                                                        desc="exporting", unit=" tensors"):
            if got != name or tensor.shape != torch.Size(shape) or tensor.dtype != dtype:
                raise RuntimeError(f"{path}: {got} {tuple(tensor.shape)} {tensor.dtype} written where the header "
                                   f"says {name} {tuple(shape)} {dtype}")
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
