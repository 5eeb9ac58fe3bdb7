"""The MLflow pyfunc of the event engine (logged as code by deploy/mlflow_model.py)."""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model


class EnginePyfunc(mlflow.pyfunc.PythonModel):
    """predict: float32 inputs shaped as the network takes them ([N, C, H, W] images or
    [N, T, C, H, W] event frames) -> [N, classes] float32 scores (the mean over time steps of
    the network's output, as training's evaluation ranks them)."""

    def load_context(self, context) -> None:
        from deploy.engine import EventEngine
        from deploy.rundir import open_run

        self.engine = EventEngine.from_run(open_run(context.artifacts["run"]))

    def predict(self, context, model_input, params=None):
        x = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        return self.engine.run(np.asarray(x, dtype=np.float32)).logits.astype(np.float32)


set_model(EnginePyfunc())
