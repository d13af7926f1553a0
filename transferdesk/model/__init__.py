"""The model: the network (`network.py`: encoder + heads), the model object that loads, saves
and predicts (`modeling.py`), the out-of-scope scores, each registered by name (`scores.py`),
confidence and hand-off (`confidence.py`), ONNX export (`export.py`) and the runtimes that
serve it (`runtime.py`)."""
