"""What both sides of the wire share: the code generated from protos/ (`pb`, `pb_grpc`) and the tensor codec.

from serving.wire import pb, pb_grpc
"""

from serving.wire._proto.conveyor.v1 import conveyor_pb2 as pb
from serving.wire._proto.conveyor.v1 import conveyor_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
