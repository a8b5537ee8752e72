"""How arrays and analysis results travel in actstore's gRPC messages, beyond what the .proto says: one
module per kind of payload, each holding both directions, so that the server (which encodes), the client
(which decodes) and the study (which reads stored results as the client would) share one definition."""
