"""Inference: loading a model file into a servable model, and the engines that step it.

model.py loads a file (`load_model`; its docstring says which module does each step).

engines/contract.py holds what every engine is checked against, engines/keras.py the
reference engine (`predict_on_batch`), engines/fast/ the NumPy engine, and
engines/factory.py, the only module that knows both, chooses between them.
"""

import os

# TensorFlow prints C++ banners when Keras first imports it: set before any module here does.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
