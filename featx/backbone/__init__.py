"""The frozen MobileNetV2: its spec, fingerprint and Keras graph (`mobilenet`), the ONNX Runtime
engine (`onnx_engine`), the opt-in INT8 engine (`int8`), the choice between them (`engines`),
and the Keras pieces fine-tuning trains with (`finetune_keras`).

Importing this package loads nothing heavy: each module imports what it needs."""
