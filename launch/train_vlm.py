#!/usr/bin/env python
"""Train the LLaVA-1.5 stage (encoder export -> projector -> causal LM) with the pretraining trainer.

    python launch/train_vlm.py --config launch/configs/vlm/tiny_stage1.yaml model.vision=runs/demo/pretrain/clip_s0/export/step_0000300
    python launch/train_vlm.py --config launch/configs/vlm/tiny_stage2.yaml model.vision=EXPORT \
        model.projector_from=runs/vlm_stage1
    deepspeed --num_gpus 8 launch/train_vlm.py --config launch/configs/vlm/llava15_vicuna7b_stage2.yaml ...
    torchrun --nproc_per_node 8 launch/train_vlm.py --config ...        srun python launch/train_vlm.py --config ...

Overrides are dotted keys: model.vision=EXPORT_DIR model.llm=LLM_DIR|tiny-llama model.projector_from=STAGE1_RUN
data.train=JSON|SHARDS run.dir=PATH schedule.steps=N checkpoint.every=N seed=N resume=auto eval.watch=true
"""
from __future__ import annotations

import sys

import _bootstrap  # noqa: F401

from train.distributed import prepare_environment

prepare_environment()  # before deepspeed is imported: CPU accelerator + gloo when there is no GPU


def main(argv: list[str] | None = None) -> int:
    from pretrain import main as train_main
    from train.vlm_config import VLM_CHOICES, VLMConfig

    return train_main(argv, __doc__, VLMConfig, VLM_CHOICES, "YAML experiment file (launch/configs/vlm/*.yaml)")


if __name__ == "__main__":
    sys.exit(main())
