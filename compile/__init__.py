"""The model compiler: ``kiln compile`` turns a local Hugging Face model or a GGUF file
into an OpenVINO IR in the model store (``compile.openvino``). It imports only
``backends`` (store, gguf), never the gateway."""
