"""The session contract, with neither gRPC nor a model runtime: chunks, sessions, batching, the engine.

It runs any `StepRunner`; the server gives it ONNX Runtime's, tests a fake one.
"""
