"""Run under torchrun by test_pretrain: builds the tiny pretraining model whole and partitioned
(`deepspeed.zero.Init`) as the trainer does, and saves both sets of initial weights from rank 0, and
each rank's whole build."""

import sys

import deepspeed
import torch

from pretrain.build import build_model
from pretrain.config import PretrainConfig
from pretrain.train import engine_config
from skillnet import load_config
from training import distributed

topology = distributed.detect()
distributed.init(topology)
config = PretrainConfig()
config.distributed.ds_overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
model_config = load_config("tiny")
whole = build_model(model_config, seed=0)
partitioned = build_model(model_config, seed=0, ds_config=engine_config(config))
held = {n: p.ds_tensor.numel() for n, p in partitioned.named_parameters()}  # this rank's share
full = {n: p.ds_numel for n, p in partitioned.named_parameters()}
with deepspeed.zero.GatheredParameters(list(partitioned.parameters())):
    gathered = {n: p.detach().clone() for n, p in partitioned.named_parameters()}
torch.save(dict(whole.named_parameters()), f"{sys.argv[1]}.rank{topology.rank}")
if topology.rank == 0:
    torch.save({"whole": dict(whole.named_parameters()), "partitioned": gathered, "held": held, "full": full},
               sys.argv[1])
