"""Generated protobuf and gRPC stubs of ``protos/raymoe/v1`` (rebuild: scripts/gen_protos.sh).

Do not edit the ``*_pb2*`` files; convert to and from numpy in ``raymoe._private.wire``.
"""
