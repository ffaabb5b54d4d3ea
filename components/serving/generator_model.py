"""The generator's model-from-code file: MLflow runs this file to build the model at load time,
so loading a logged generator unpickles nothing (its weights are safetensors, its code is this
repository's ``components`` package, copied into the model)."""

from mlflow.models import set_model

from components.serving.generator import LatentflowGenerator

set_model(LatentflowGenerator())
