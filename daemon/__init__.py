"""lstmd: a streaming inference daemon for stateful recurrent Keras models on Kafka."""

__version__ = "0.1.0"
