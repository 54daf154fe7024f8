"""`python -m lora_trainer demo`: the embedded default run.

Builds a synthetic captioned dataset (coloured shapes with a trigger word), trains a LoRA on the built-in tiny SD1
model on whatever device is there (a CPU is enough: about a minute), renders samples through the backend, writes
charts, and says where everything is. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from . import config as cfgmod
from .synthetic import make_dataset

log = logging.getLogger(__name__)

DEMO_PROMPTS = """# kohya sample-prompt syntax: --n negative, --w/--h size, --d seed, --l CFG, --s steps
shapetok, red circle, blue background --n blurry --w 64 --h 64 --d 1 --l 5 --s 12
shapetok, yellow triangle, black background --w 128 --h 64 --d 2 --l 5 --s 12
"""


def demo_config(output: str, steps: int | None = None) -> cfgmod.TrainConfig:
    dataset = make_dataset(os.path.join(output, "dataset"), images=12, repeats=4, size=64)
    prompts = os.path.join(output, "sample_prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write(DEMO_PROMPTS)
    return cfgmod.TrainConfig(
        pretrained_model_name_or_path="tiny-sd1", train_data_dir=dataset, output_dir=output, output_name="demo_lora",
        resolution="64", min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=64,
        network_module="lora", network_dim=8, network_alpha=8.0, learning_rate=1e-3, text_encoder_lr=5e-4,
        optimizer_type="AdamW", lr_scheduler="cosine", lr_warmup_steps=0.05, train_batch_size=4,
        max_train_epochs=None if steps else 8, max_train_steps=steps or 1600, save_every_n_epochs=4,
        shuffle_caption=True, keep_tokens=1, sample_prompts=prompts, sample_every_n_epochs=4, seed=42,
        mixed_precision="no", cache_latents=True, overwrite=True,
        training_comment="Train LoRA demo on the tiny SD1 model")


def run_demo(output: str, steps: int | None = None, as_json: bool = False) -> int:
    from .backends.diffusers_backend import load_bundle
    from .cli import ProgressPrinter
    from .train import TrainCallbacks, resolve_device, train

    os.makedirs(output, exist_ok=True)
    cfg = demo_config(output, steps)
    bundle = load_bundle(cfg.pretrained_model_name_or_path, device=resolve_device(cfg.device))
    result = train(cfg, bundle, TrainCallbacks(on_progress=None if as_json else ProgressPrinter()))
    summary = {"final_file": result.final_file, "files": result.files, "samples": result.samples,
               "charts": result.charts, "steps": result.steps, "epochs": result.epochs,
               "first_epoch_loss": result.first_epoch_loss, "last_epoch_loss": result.last_epoch_loss,
               "seconds": round(result.seconds, 1), "steps_explained": result.plan.explain()}
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return 0
    out = sys.stdout
    out.write(f"\nDemo finished in {result.seconds:.0f} s: {result.plan.explain()}\n")
    out.write(f"  LoRA:     {result.final_file}\n")
    out.write(f"  saves:    {', '.join(os.path.basename(f) for f in result.files)}\n")
    out.write(f"  samples:  {os.path.join(output, 'sample')} ({len(result.samples)} images)\n")
    out.write(f"  charts:   {', '.join(result.charts)}\n")
    out.write(f"  loss:     first epoch {result.first_epoch_loss:.4f} -> last epoch {result.last_epoch_loss:.4f}\n")
    out.write("Copy the LoRA into the WebUI's models/Lora folder to use it with an SD1.5 model "
              "(this one was trained on the random tiny model, so it only shows that the pipeline works).\n")
    return 0
