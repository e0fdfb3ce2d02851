"""What both sides of the wire share: the code generated from protos/ (`pb`, `pb_grpc`: Conveyor's own
protocol; `oip`, `oip_grpc`: the Open Inference Protocol) and the tensor codec.

from serving.wire import pb, pb_grpc
"""

from serving.wire._proto.conveyor.v1 import conveyor_pb2 as pb
from serving.wire._proto.conveyor.v1 import conveyor_pb2_grpc as pb_grpc
from serving.wire._proto.inference import grpc_service_pb2 as oip
from serving.wire._proto.inference import grpc_service_pb2_grpc as oip_grpc

__all__ = ["oip", "oip_grpc", "pb", "pb_grpc"]
