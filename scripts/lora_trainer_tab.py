"""Train LoRA for the AUTOMATIC1111 WebUI: registers the tab and the API; the code lives in the lora_trainer package.

The WebUI puts this extension's folder on sys.path only while this file loads; it is added for good so that the
package's lazy imports keep working. A failure here is reported, never raised: the WebUI always starts.
"""

import logging
import os
import sys

_EXT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXT_DIR not in sys.path:
    sys.path.insert(0, _EXT_DIR)

_log = logging.getLogger("lora_trainer")


def _load():
    import lora_trainer

    where = os.path.dirname(os.path.abspath(lora_trainer.__file__))
    if not where.startswith(_EXT_DIR):
        raise ImportError(f"another package named lora_trainer ({where}) shadows this extension's")
    from lora_trainer.webui import register

    register()


try:
    _load()
except Exception:  # never stop the WebUI from starting
    _log.exception("Train LoRA could not load; the WebUI continues without it")
