"""Samplers for preview images in the standalone backend (diffusers schedulers, built from our schedule)."""

from __future__ import annotations

from typing import Any

from ..errors import UserError

# config sample_sampler -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
}


def make_scheduler(name: str, schedule: dict[str, Any], prediction_type: str):
    import diffusers

    try:
        cls_name, extra = SAMPLERS[name]
    except KeyError:
        raise UserError(f"sample_sampler: {name!r} is not one of {', '.join(SAMPLERS)}") from None
    cls = getattr(diffusers, cls_name)
    return cls(**schedule, prediction_type=prediction_type, timestep_spacing="leading", **extra)
