"""Peak memory of exporting a ZeRO-3 checkpoint: `pretrain.export` against DeepSpeed's zero_to_fp32.

    python benchmarks/export_memory.py [--hidden 768 --layers 4]

Trains one step of a multimodal model (6 skills in FFN and attention) on 2 CPU ranks to get a real
ZeRO-3 checkpoint, then exports it in separate processes and reads each one's peak resident memory
(wait4's ru_maxrss): `pretrain.export` in fp32 and bf16, and `convert_zero_checkpoint_to_fp32_state_dict`.
Memory is reported above the baseline of a process that only imports torch, deepspeed and transformers,
as a ratio to the exported file's size (target: at most 1.5x).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
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
            ("deepspeed zero_to_fp32",
             "from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c; "
             f"c('{ckpt.parent}', '{tmp / 'ds'}', tag='{ckpt.name}', safe_serialization=True)",
             tmp / "ds" / "model.safetensors"),
        ]:
            peak = peak_rss(code)
            size = out.stat().st_size
            rows.append((label, size, peak, (peak - baseline) / size))
    print(f"exporting a ZeRO-3 checkpoint of 2 ranks (hidden {args.hidden}, {args.layers} layers); baseline process "
          f"(imports only) {baseline / 2**20:.0f} MiB")
    print(f"  {'exporter':<26}{'file MiB':>10}{'peak MiB':>10}{'(peak - baseline) / file':>26}")
    for label, size, peak, ratio in rows:
        print(f"  {label:<26}{size / 2**20:>10.0f}{peak / 2**20:>10.0f}{ratio:>26.2f}")
    ok = all(ratio <= 1.5 for label, _, _, ratio in rows if label.startswith("pretrain"))
    print(f"\n  target (pretrain.export) <= 1.50: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
