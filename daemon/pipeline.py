"""What `lstmd run` and `lstmd replay` both build: the model, its engine and the processor.

One place, so that both apply exactly the same pipeline from the same LSTMD_*
settings (a replay reproduces what the daemon does), and so the daemon's processes
(daemon/pod) and the command line spell "settings to processor" once.
"""

from __future__ import annotations

from pathlib import Path

from daemon.config import PipelineSettings, Settings
from daemon.core import codec
from daemon.core.processor import Processor
from daemon.core.state import StateStore
from daemon.ops import logs
from daemon.ops.metrics import Metrics


def build_processor(
    model_path: Path,
    engine_name: str,
    metrics: Metrics,
    threads: int = 0,
    *,
    delivery: str = "at-least-once",
    max_sequences: int = 0,
    max_ended_sequences: int | None = None,
    max_record_bytes: int = 1 << 20,
    reset_on_gap: bool = False,
    publish_from_ms: int | None = None,
    wire: codec.Wire = codec.JSON_WIRE,
) -> Processor:
    """Load the model and its engine: shared by `run` and `replay` so both behave alike."""
    from daemon.inference.engines.factory import make_engine  # TensorFlow loads here, not at import
    from daemon.inference.model import load_model

    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
    model = load_model(model_path)
    engine, refused = make_engine(engine_name, model)
    if refused is not None:
        logs.get_logger("daemon").warning(
            "fast_engine_refused",
            reason=refused,
            engine=engine.name,
            message=f"fast engine refused: {refused}; using {engine.name}",
        )
    info = {
        "name": model.identity.name,
        "sha256": model.identity.sha256,
        "features": str(model.n_features),
        "outputs": str(model.output_width),
    }
    metrics.model_info.labels(**info).set(1)
    metrics.describe(engine=engine.name, delivery=delivery)
    processor = Processor(
        engine,
        model_id=str(model.identity),
        n_features=model.n_features,
        store=StateStore(max_sequences, max_ended_sequences),
        metrics=metrics,
        max_record_bytes=max_record_bytes,
        reset_on_gap=reset_on_gap,
        state_shapes=model.state_shapes,
        publish_from_ms=publish_from_ms,
        wire=wire,
    )
    processor.info = info  # the labels of lstmd_model_info, for a promotion to set
    return processor


def input_fields(settings: PipelineSettings) -> codec.Fields:
    """Where the input's fields are (LSTMD_INPUT_*_FIELD)."""
    return codec.Fields(
        x=settings.input_x_field,
        x_fields=settings.x_fields,
        end=settings.input_end_field,
        start=settings.input_start_field,
        step=settings.input_step_field,
        ts=settings.input_ts_field,
    )


def processor_from_settings(
    settings: PipelineSettings, model_path: Path, metrics: Metrics, wire: codec.Wire | None = None
) -> Processor:
    """The processor the settings describe. `lstmd run`'s Settings also say the delivery,
    the ended sequences remembered and LSTMD_PUBLISH_FROM; a replay's PipelineSettings
    do not (the defaults of `build_processor`). `wire`: the run's value formats
    (daemon/schemas); JSON with the settings' field names if None (a replay)."""
    daemon = settings if isinstance(settings, Settings) else None
    return build_processor(
        model_path,
        settings.engine,
        metrics,
        settings.tf_intra_op_threads,
        delivery=daemon.delivery if daemon is not None else "at-least-once",
        max_sequences=settings.max_sequences,
        max_ended_sequences=daemon.max_ended_sequences if daemon is not None else None,
        max_record_bytes=settings.max_record_bytes,
        reset_on_gap=settings.step_gap == "reset",
        publish_from_ms=daemon.publish_from_ms if daemon is not None else None,
        wire=wire if wire is not None else codec.Wire(fields=input_fields(settings)),
    )
