"""The gRPC wire (protos/encoder.proto, package encoder_service.v1) as Python objects; no pickle crosses
the network. Tensors travel as raw bytes + dtype + shape; schema-less extras as msgpack.

- `channel`: gRPC settings for messages of tens of MB;
- `status`: failures as gRPC statuses with standard details (which item, which are missing);
- `protobuf`: the few wire-format primitives the hand-framed messages need;
- `tensors`: tensors <-> bytes, dtype codes, one GIL-free copy into a message;
- `media`: MediaInput <-> MediaItem;
- `responses`: EncodeResponse, framed around the rows where they live (server) and read in place (client);
- `streams`: EncodeStream messages, and putting a stream back together;
- `model_info`: ModelInfo and ModelFingerprint <-> their messages.
The bytes are ordinary protobuf: any client generated from the .proto parses them.
"""
