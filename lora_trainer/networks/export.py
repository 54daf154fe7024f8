"""Writing network files as kohya/LyCORIS files: dtype, `ss_*` and `modelspec.*` metadata, hashes, atomic write.

A1111 reads `ss_output_name` (the alias in `<lora:alias:1>`), `ss_base_model_version`/`ss_v2` (which model family
the Lora tab shows the file for) and trusts `sshs_model_hash` as the file's hash, so that one is computed exactly as
kohya does: sha256 of the bytes after the safetensors header. Forge detects SD1 only through
`modelspec.architecture`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import save as st_save

from .. import __version__
from ..config import TrainConfig
from ..fileio import atomic_write_bytes, atomic_write_with
from .algorithms import ALGORITHMS

SAVE_DTYPES = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def base_model_version(family: str, v_pred: bool) -> str:
    if family == "sdxl":
        return "sdxl_base_v1-0"
    return ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if v_pred else "")


def architecture(family: str, v_pred: bool) -> str:
    if family == "sdxl":
        return "stable-diffusion-xl-v1-base/lora"
    if family == "sd2":
        return "stable-diffusion-v2-768-v/lora" if v_pred else "stable-diffusion-v2-512/lora"
    return "stable-diffusion-v1/lora"


def network_args(cfg: TrainConfig) -> dict[str, str]:
    """What kohya/LyCORIS would record as --network_args for this network."""
    algo = cfg.network_module
    args: dict[str, Any] = {}
    if algo in ("loha", "lokr", "ia3"):
        args["algo"] = algo
    if algo in ("locon", "loha", "lokr", "dylora"):
        args.update(conv_dim=cfg.effective_conv_dim, conv_alpha=cfg.effective_conv_alpha)
    if algo == "lokr":
        args["factor"] = cfg.lokr_factor
    if algo == "dylora":
        args["unit"] = cfg.dylora_unit
    for name in ("rank_dropout", "module_dropout"):
        if getattr(cfg, name):
            args[name] = getattr(cfg, name)
    return {k: str(v) for k, v in args.items()}


@dataclass
class RunInfo:
    """Facts about the run that the metadata records besides the config."""

    family: str
    v_pred: bool
    model_name: str = ""
    model_hash: str | None = None
    legacy_model_hash: str | None = None
    vae_name: str | None = None
    session_id: int = 0
    training_started_at: float = 0.0
    seed: int = 0
    clip_skip: int | None = None
    num_train_images: int = 0
    num_reg_images: int = 0
    num_batches_per_epoch: int = 0
    num_epochs: int = 0
    max_train_steps: int = 0
    warmup_steps: int = 0
    dataset: dict[str, Any] = field(default_factory=dict)  # tag_frequency, dataset_dirs, reg_dataset_dirs, bucket_info


def build_metadata(cfg: TrainConfig, run: RunInfo, *, steps: int, epoch: int, title: str) -> dict[str, str]:
    """kohya's `ss_*` keys (only the minimum set with no_metadata) plus SAI `modelspec.*`; all values are strings."""
    full = _ss_metadata(cfg, run, steps, epoch)
    meta = {k: full[k] for k in MINIMUM_KEYS} if cfg.no_metadata else full
    meta.update(_modelspec(cfg, run, title))
    return {k: str(v) for k, v in meta.items()}


def _ss_metadata(cfg: TrainConfig, run: RunInfo, steps: int, epoch: int) -> dict[str, Any]:
    w, h = cfg.resolution_wh
    opt_args = f"({','.join(cfg.optimizer_args)})" if cfg.optimizer_args else ""
    ds = run.dataset
    meta: dict[str, Any] = {
        "ss_session_id": run.session_id, "ss_training_started_at": run.training_started_at,
        "ss_output_name": cfg.output_name, "ss_learning_rate": cfg.learning_rate,
        "ss_text_encoder_lr": cfg.effective_text_encoder_lr, "ss_unet_lr": cfg.effective_unet_lr,
        "ss_num_train_images": run.num_train_images, "ss_num_reg_images": run.num_reg_images,
        "ss_num_batches_per_epoch": run.num_batches_per_epoch, "ss_num_epochs": run.num_epochs,
        "ss_epoch": epoch, "ss_steps": steps, "ss_max_train_steps": run.max_train_steps,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "ss_lr_warmup_steps": run.warmup_steps, "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_network_module": ALGORITHMS[cfg.network_module].kohya_module,
        "ss_network_dim": cfg.network_dim if cfg.network_module != "ia3" else None,
        "ss_network_alpha": cfg.network_alpha if cfg.network_module != "ia3" else None,
        "ss_network_dropout": cfg.network_dropout, "ss_network_args": json.dumps(network_args(cfg)),
        "ss_mixed_precision": cfg.mixed_precision, "ss_full_fp16": False,
        "ss_v2": run.family == "sd2", "ss_base_model_version": base_model_version(run.family, run.v_pred),
        "ss_clip_skip": run.clip_skip, "ss_max_token_length": cfg.max_token_length,
        "ss_cache_latents": cfg.cache_latents, "ss_seed": run.seed, "ss_noise_offset": cfg.noise_offset,
        "ss_min_snr_gamma": cfg.min_snr_gamma, "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_training_comment": cfg.training_comment, "ss_optimizer": f"{cfg.optimizer_type}{opt_args}",
        "ss_max_grad_norm": cfg.max_grad_norm, "ss_caption_dropout_rate": cfg.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": cfg.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": cfg.caption_tag_dropout_rate, "ss_zero_terminal_snr": False,
        "ss_batch_size_per_device": cfg.train_batch_size,
        "ss_total_batch_size": cfg.train_batch_size * cfg.gradient_accumulation_steps,
        "ss_resolution": f"({w}, {h})", "ss_color_aug": cfg.color_aug, "ss_flip_aug": cfg.flip_aug,
        "ss_random_crop": cfg.random_crop, "ss_shuffle_caption": cfg.shuffle_caption,
        "ss_enable_bucket": cfg.enable_bucket, "ss_bucket_no_upscale": cfg.bucket_no_upscale,
        "ss_min_bucket_reso": cfg.min_bucket_reso, "ss_max_bucket_reso": cfg.max_bucket_reso,
        "ss_keep_tokens": cfg.keep_tokens, "ss_sd_model_name": run.model_name,
        "ss_training_finished_at": _dt.datetime.now().timestamp(),
        "ss_sd_scripts_commit_hash": f"train-lora {__version__}",
    }
    for key in ("tag_frequency", "dataset_dirs", "reg_dataset_dirs", "bucket_info"):
        meta[f"ss_{key}"] = json.dumps(ds.get(key, {}))
    if run.model_hash:
        meta["ss_new_sd_model_hash"] = run.model_hash
    if run.legacy_model_hash:
        meta["ss_sd_model_hash"] = run.legacy_model_hash
    if run.vae_name:
        meta["ss_vae_name"] = run.vae_name
    return meta


def _modelspec(cfg: TrainConfig, run: RunInfo, title: str) -> dict[str, str]:
    w, h = cfg.resolution_wh
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture(run.family, run.v_pred),
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if run.family == "sdxl"
                                     else "diffusers"),
        "modelspec.title": title,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": _dt.datetime.now().replace(microsecond=0).isoformat(),
        "modelspec.prediction_type": "v" if run.v_pred else "epsilon",
        "modelspec.implementation_version": f"train-lora/{__version__}",
    }
    if run.clip_skip:
        spec["modelspec.encoder_layer"] = str(run.clip_skip)
    if cfg.training_comment:
        spec["modelspec.description"] = cfg.training_comment
    return spec


def cast_for_save(tensors: dict[str, torch.Tensor], save_precision: str) -> dict[str, torch.Tensor]:
    dtype = SAVE_DTYPES[save_precision]
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}


def addnet_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's (sshs_model_hash, sshs_legacy_hash): sha256 of the tensor bytes, and the old 8-char hash of a
    serialisation that holds only the `ss_*` metadata."""
    data = st_save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def save_network(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None,
                 save_precision: str) -> str:
    """Write the file atomically; returns the sshs_model_hash (safetensors) or "" (ckpt/pt)."""
    tensors = cast_for_save(tensors, save_precision)
    if not path.endswith(".safetensors"):
        atomic_write_with(path, lambda tmp: torch.save(tensors, tmp))
        return ""
    meta = dict(metadata or {})
    model_hash, legacy = addnet_hashes(tensors, meta)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy
    atomic_write_bytes(path, st_save(tensors, metadata=meta))
    return model_hash


def legacy_checkpoint_hash(path: str) -> str | None:
    """The old A1111 8-character model hash kohya records as ss_sd_model_hash."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
