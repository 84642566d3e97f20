"""Generated gRPC stubs for proto/etrain.proto (see codegen.py)."""
