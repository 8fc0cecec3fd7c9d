"""Publishing over ZeroMQ: the wire format, the publisher and its snapshot socket, CURVE security and the
volume archive that survives restarts."""
