"""modules/paths.py: data_path is set by the test fixture."""

data_path = "."
models_path = "./models"
script_path = "."
