"""The pure core: records, the wire format, per-sequence state and the processor.

No I/O, no Kafka, no TensorFlow (an import contract of `make lint`): the processor
steps sequences through the `Engine` port (engine.py) that daemon.inference implements,
so the same semantics serve `lstmd run` and `lstmd replay` and are unit-tested alone.
"""
