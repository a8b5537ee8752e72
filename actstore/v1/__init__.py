"""Generated gRPC/protobuf code of the actstore.v1 API (see proto/); do not edit by hand."""
