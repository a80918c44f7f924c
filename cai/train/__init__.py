"""QLoRA fine-tuning (SFT, then DPO) of a run folder's data: settings (config), checks (guards), lineage (manifest)
and the training itself (trainer). Heavy libraries (torch, transformers, trl, peft) are imported when training."""

from cai.train.config import (
           STAGES,
           CaiArgs,
           TrainSetup,
           config_help,
           parse_config,
           recipe_path,
)
from cai.train.guards import NonFiniteLoss
from cai.train.trainer import TrainProgress, last_checkpoint, train

__all__ = ["STAGES", "CaiArgs", "NonFiniteLoss", "TrainProgress", "TrainSetup", "config_help", "last_checkpoint",
           "parse_config", "recipe_path", "train"]
