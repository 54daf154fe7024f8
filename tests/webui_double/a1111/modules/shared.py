"""modules/shared.py: opts, cmd_opts, state, sd_model (a property in the real WebUI), parallel_processing_allowed,
OptionInfo/options_section and hide_dirs (v1.10.1 `modules/shared.py:21,76-77`)."""

import types

from modules import shared_state
from modules.options import OptionInfo, Options, options_section  # noqa: F401  (re-exported like the real module)

opts = Options({
    "CLIP_stop_at_last_layers": 1, "sd_model_checkpoint": "", "sd_vae": "Automatic", "sd_unet": "Automatic",
    "samples_format": "png", "live_previews_enable": True, "persistent_cond_cache": True,
    "fp8_storage": "Disable", "lora_functional": False,
})
cmd_opts = types.SimpleNamespace(lora_dir="models/Lora", lowvram=False, medvram=False, medvram_sdxl=False,
                                 api_auth=None, no_half=True, data_dir=".", models_dir=None, ckpt_dir=None,
                                 vae_dir=None, lyco_dir_backcompat="models/LyCORIS", api=False, nowebui=False,
                                 hide_ui_dir_config=False, freeze_settings=False)
state = shared_state.State()
parallel_processing_allowed = True
sd_model = None  # the fixture sets it (the real one is a property that loads the model on demand)
hide_dirs = {"visible": not cmd_opts.hide_ui_dir_config}
