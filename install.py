"""Run by the WebUI at start-up and after an install from the Extensions tab (in its own process).

Installs only what Train LoRA needs and the WebUI lacks, never changing a package that is already installed.
Set LORA_TRAINER_SKIP_INSTALL=1 to skip it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lora_trainer.installer import main

main()
