"""Train LoRA: a LoRA/LyCORIS trainer for Stable Diffusion that runs inside the AUTOMATIC1111 WebUI or headless.

The core (this package minus `webui/`) never imports the WebUI or Gradio, and imports diffusers/transformers only
inside `backends/`. Importing the package has no side effects.
"""

__version__ = "0.1.0"
