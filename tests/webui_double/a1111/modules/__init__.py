"""Double of AUTOMATIC1111's `modules` package (v1.10.1 surface used by Train LoRA)."""
