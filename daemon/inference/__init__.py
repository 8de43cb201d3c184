"""Inference: loading a model file into a servable model, and the engines that step it.

engines/contract.py holds what every engine is checked against, engines/keras.py the
reference engine (`predict_on_batch`), engines/fast/ the NumPy engine, and
engines/factory.py, the only module that knows both, chooses between them.
"""
