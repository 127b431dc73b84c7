"""The training layer pretraining and finetuning share (it imports neither):

- `config`: typed configs from YAML and `key=value` overrides, and the shared sections;
- `optim`: AdamW with one weight-decay rule and the warmup/linear-decay schedule;
- `sampling`: the alpha rule for mixing tasks, resume-safe;
- `parallelize`: everything applied to a pure model, in one order (build, skill split, activation
  checkpointing, optimizer groups, the engine);
- `zero`: the DeepSpeed engine's config and set-up, and every use of DeepSpeed internals;
- `step`: one optimizer step over several micro-batches (`optimizer_step`);
- `loop`: the loop both trainers run (logs, checkpoints, stop signals);
- `metrics`: TensorBoard, tqdm and `steps.jsonl`, summed over ranks;
- `run`: the command lines' skeleton (`Prepared`, bad input in one line, exit statuses 0/2/3);
- `checkpoint`: save, find and resume checkpoints (at any world size: `reshard` writes the universal copy
  offline); `signals`: stop and requeue; `distributed`: ranks.
"""
