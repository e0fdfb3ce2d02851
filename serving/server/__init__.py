"""The server side: the gRPC servicer, wiring, metrics and the ONNX Runtime runner, around the domain."""
