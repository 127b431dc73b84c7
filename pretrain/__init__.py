"""Distributed sparse pretraining of SkillNet models (DeepSpeed). `python -m pretrain.describe` prints a
config's skills, task table and parameter counts."""
