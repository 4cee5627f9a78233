"""The code MLflow runs to load a scoring model (MLflow's models-from-code).

``pipelines.tracking.scoring`` logs every pyfunc model with this file as its ``python_model``:
loading the model runs this file and the logged ``pipelines`` package, and reads the artifacts
(``bundle.pt`` or ``family.pt``) with ``torch.load(weights_only=True)``. No Python object is
unpickled.
"""

import mlflow.models

from pipelines.tracking.scoring import ScoringModel

mlflow.models.set_model(ScoringModel())
