"""The model: the network (`network.py`: encoder + heads), the model object that loads, saves
and predicts (`modeling.py`), confidence and hand-off (`confidence.py`), ONNX export
(`export.py`) and the runtimes that serve it (`runtime.py`)."""
