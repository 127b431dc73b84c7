"""Peak memory of exporting a ZeRO-3 checkpoint (`pretrain.export`, whole and for one task, against DeepSpeed's
zero_to_fp32), and what serving one task costs from a per-task export against the full model.

    python benchmarks/export_memory.py [--hidden 768 --layers 4] [--only export|load]

Export: trains one step of a multimodal model (6 skills in FFN and attention) on 2 CPU ranks to get a real
ZeRO-3 checkpoint, then exports it in separate processes and reads each one's peak resident memory
(wait4's ru_maxrss): `pretrain.export` in fp32 and bf16, `pretrain.export --tasks masked_lm` (only that
task's skills), and `convert_zero_checkpoint_to_fp32_state_dict`. Memory is reported above the baseline of
a process that only imports torch, deepspeed and transformers, as a ratio to the exported file's size
(target: at most 1.5x).

Load: `multimodal-base` and SkillNet-NLU base at full size (random weights), saved whole and extracted for
one task (`model.extract`); for each, the file size, and the peak memory (above the baseline) and seconds of
`from_pretrained` with every weight then read into memory of its own (safetensors are memory-mapped, so a
weight costs memory once touched; moving the model to a GPU touches all), in a fresh process, as ratios of
the extracted model's to the full one's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss(code: str) -> int:
    """Peak resident bytes of a fresh Python process running `code`."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return usage.ru_maxrss * 1024


def benchmark_model(hidden: int, layers: int) -> str:
    """The inline model config of the checkpoint benchmarks: multimodal, 6 skills in FFN and attention."""
    return (f"{{skill_set: multimodal, modalities: [text, code, image, audio, video], vocab_size: 512, "
            f"hidden_size: {hidden}, num_hidden_layers: {layers}, num_attention_heads: {hidden // 64}, "
            f"intermediate_size: {4 * hidden}, skill_attention: true, image_size: 32, patch_size: 8, "
            f"num_mel_bins: 16, max_audio_frames: 256, num_frames: 4, projection_dim: 64}}")


LOAD = """
import sys, time, torch
from skillnet import SkillNetModel
start = time.perf_counter()
model = SkillNetModel.from_pretrained(sys.argv[1])
for p in model.parameters():  # read every weight into memory of its own, as moving it to a GPU would
    p.data = p.data.clone()
print(time.perf_counter() - start)
"""


def loading(name: str, task: str, tmp: Path) -> tuple[float, float, float]:
    """(file size, peak memory above the baseline, seconds of `from_pretrained`): extracted for `task` over
    full, for the shipped model config `name` at full size."""
    import torch

    from skillnet import SkillNetModel, load_config

    with torch.device("meta"):
        full = SkillNetModel(load_config(name))
    full = full.to_empty(device="cpu")  # the weights' values do not matter here, only their sizes
    folders = {"full": tmp / f"{name}-full", "extracted": tmp / f"{name}-{task}"}
    full.save_pretrained(folders["full"])
    full.extract([task]).save_pretrained(folders["extracted"])
    del full
    baseline = peak_rss("import torch, transformers, skillnet")
    got = {}
    for kind, folder in folders.items():
        seconds = subprocess.run([sys.executable, "-c", LOAD, str(folder)], cwd=ROOT, check=True, capture_output=True,
                                 text=True).stdout.split()[-1]
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        got[kind] = (size, peak_rss(LOAD.replace("sys.argv[1]", repr(str(folder)))) - baseline, float(seconds))
    print(f"  {name}, {task}: file {got['full'][0] / 2**20:.0f} -> {got['extracted'][0] / 2**20:.0f} MiB, "
          f"load peak {got['full'][1] / 2**20:.0f} -> {got['extracted'][1] / 2**20:.0f} MiB, "
          f"load {got['full'][2]:.2f} -> {got['extracted'][2]:.2f} s")
    return tuple(e / f for e, f in zip(got["extracted"], got["full"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--only", choices=["export", "load"])
    args = parser.parse_args(argv)
    ok = True
    if args.only != "load":
        ok = export_rows(args)
    if args.only != "export":
        print("\nserving one task: the model extracted for it over the full model (fresh processes, CPU)")
        with tempfile.TemporaryDirectory() as tmp:
            rows = [(name, task, loading(name, task, Path(tmp))) for name, task in
                    (("multimodal-base", "masked_lm"), ("skillnet-nlu-base", "sentiment_analysis"))]
        print(f"\n  {'model, task':<40}{'file':>8}{'load peak':>12}{'load time':>12}   (extracted / full)")
        for name, task, (size, peak, seconds) in rows:
            print(f"  {name + ', ' + task:<40}{size:>8.2f}{peak:>12.2f}{seconds:>12.2f}")
    return 0 if ok else 1


def export_rows(args) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pretrain.prepare_sample", "--out", str(tmp / "sample")], cwd=ROOT,
                       check=True, capture_output=True)
        model = benchmark_model(args.hidden, args.layers)
        run = tmp / "run"
        train = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29741", "-m",
             "pretrain", "--config", "tiny", f"model={model}", f"data_root={tmp / 'sample'}", f"run_dir={run}",
             "train.steps=1", "train.micro_batch_size=2"], cwd=ROOT, capture_output=True, text=True)
        if train.returncode:
            raise RuntimeError(train.stdout[-2000:] + train.stderr[-2000:])
        ckpt = run / "checkpoints" / "step00000001"
        baseline = peak_rss("import torch, deepspeed, transformers, safetensors")
        rows = []
        for label, code, out in [
            ("pretrain.export, fp32", f"from pretrain.export import export; export('{ckpt}', '{tmp / 'fp32'}')",
             tmp / "fp32" / "model.safetensors"),
            ("pretrain.export, bf16", f"from pretrain.export import export; export('{ckpt}', '{tmp / 'bf16'}', 'bf16')",
             tmp / "bf16" / "model.safetensors"),
            ("pretrain.export --tasks masked_lm",
             f"from pretrain.export import export; export('{ckpt}', '{tmp / 'mlm'}', tasks=['masked_lm'])",
             tmp / "mlm" / "model.safetensors"),
            ("deepspeed zero_to_fp32",
             "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c; "
             f"c('{ckpt.parent}', '{tmp / 'ds'}', tag='{ckpt.name}')",  # safetensors refuses the tied weights
             tmp / "ds" / "pytorch_model.bin"),
        ]:
            peak = peak_rss(code)
            size = out.stat().st_size
            rows.append((label, size, peak, (peak - baseline) / size))
    print(f"exporting a ZeRO-3 checkpoint of 2 ranks (hidden {args.hidden}, {args.layers} layers); baseline process "
          f"(imports only) {baseline / 2**20:.0f} MiB")
    print(f"  {'exporter':<36}{'file MiB':>10}{'peak MiB':>10}{'(peak - baseline) / file':>26}")
    for label, size, peak, ratio in rows:
        print(f"  {label:<36}{size / 2**20:>10.0f}{peak / 2**20:>10.0f}{ratio:>26.2f}")
    ok = all(ratio <= 1.5 for label, _, _, ratio in rows if label.startswith("pretrain"))
    print(f"\n  target (pretrain.export) <= 1.50: {'met' if ok else 'NOT met'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
