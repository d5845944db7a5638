"""The protobuf messages of the Tinker wire protocol, declared here.

Two of Tinker's bodies are protobuf: the ``forward_backward`` request and the
``ForwardBackwardOutput`` / ``SampleResponse`` results. This table is the
schema (message, field name, number, type; field numbers are the wire
contract), built into a descriptor pool of its own at import, so no generated
code and no ``protoc`` step. Messages the front end never reads or writes
(images, audio, provenance spans) are left out: protobuf skips unknown fields.

Numeric arrays travel as little-endian ``bytes``: token ids as int32, floats
as float32, offsets and sparse indices as int64.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor_pb2 import FieldDescriptorProto as _F

PACKAGE = "tinker_public"

# Field spec: (name, number, type, label) with optional type name and oneof.
# Types are FieldDescriptorProto type names without "TYPE_"; label "repeated"
# or "" (singular); a "?" suffix on the name marks a proto3 ``optional``.
_ENUMS = {
    "StopReason": [("STOP_REASON_STOP", 0), ("STOP_REASON_LENGTH", 1)],
    "DType": [("DTYPE_UNSPECIFIED", 0), ("DTYPE_FLOAT32", 1), ("DTYPE_INT64", 2),
              ("DTYPE_INT32", 3), ("DTYPE_BFLOAT16", 4)],
}

_MESSAGES: dict[str, list[tuple]] = {
    # -- requests --------------------------------------------------------------------
    "ForwardBackwardRequest": [
        ("model_id", 1, "STRING"), ("seq_id", 2, "INT32"),
        ("data", 3, "MESSAGE", "repeated", "Datum"), ("loss_fn", 4, "STRING"),
        ("loss_fn_config", 5, "MAP", "double"), ("forward_only", 6, "BOOL"),
        ("loss_fn_config_v2", 7, "MAP", "LossConfigValue"),
    ],
    "LossConfigValue": [("number", 1, "DOUBLE", "", None, "value"),
                        ("text", 2, "STRING", "", None, "value")],
    "Datum": [("model_input", 1, "MESSAGE", "repeated", "Chunk"),
              ("loss_fn_inputs", 2, "MAP", "Tensor")],
    "Chunk": [("encoded_text", 1, "MESSAGE", "", "EncodedTextChunk", "chunk"),
              ("image", 2, "BYTES", "", None, "chunk"),
              ("dmel", 3, "BYTES", "", None, "chunk")],
    "EncodedTextChunk": [("tokens", 1, "BYTES")],
    "SparseCsr": [("values", 1, "BYTES"), ("crow_indices", 2, "BYTES"),
                  ("col_indices", 3, "BYTES")],
    "Tensor": [("dense", 1, "BYTES", "", None, "encoding"),
               ("sparse_csr", 2, "MESSAGE", "", "SparseCsr", "encoding"),
               ("dtype", 3, "ENUM", "", "DType"), ("shape", 4, "INT64", "repeated")],
    # -- results ---------------------------------------------------------------------
    "BatchedTensor": [("data", 1, "BYTES"), ("offsets", 2, "BYTES"),
                      ("dtype", 3, "ENUM", "", "DType"),
                      ("trailing_shape", 4, "INT64", "repeated")],
    "ArrayRecord": [("type_tag", 1, "STRING"), ("fields", 2, "MAP", "BatchedTensor"),
                    ("num_datums", 3, "INT64")],
    "ForwardBackwardOutput": [("loss_fn_output_type", 1, "STRING"),
                              ("loss_fn_outputs", 2, "MESSAGE", "repeated", "ArrayRecord"),
                              ("metrics", 3, "MAP", "double")],
    "SampledSequence": [("stop_reason", 1, "ENUM", "", "StopReason"), ("tokens", 2, "BYTES"),
                        ("logprobs?", 3, "BYTES")],
    "SampleResponse": [("sequences", 1, "MESSAGE", "repeated", "SampledSequence"),
                       ("prompt_logprobs?", 2, "BYTES"),
                       ("prompt_cache_hit_tokens", 4, "INT32")],
}

def _scalar_or_message(field: _F, kind: str) -> None:
    if kind in _MESSAGES:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
    elif kind in _ENUMS:
        field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.{kind}"
    else:
        field.type = getattr(_F, "TYPE_" + kind.upper())


def _add_message(fd: descriptor_pb2.FileDescriptorProto, name: str, fields: list[tuple]) -> None:
    msg = fd.message_type.add(name=name)
    oneofs: list[str] = []
    for spec in fields:
        fname, number, kind = spec[:3]
        label = spec[3] if len(spec) > 3 else ""
        ref = spec[4] if len(spec) > 4 else None
        oneof = spec[5] if len(spec) > 5 else None
        optional = fname.endswith("?")
        fname = fname.rstrip("?")
        f = msg.field.add(name=fname, number=number, json_name=fname)
        f.label = _F.LABEL_REPEATED if label == "repeated" or kind == "MAP" else _F.LABEL_OPTIONAL
        if kind == "MAP":
            # A map is a repeated nested "<Name>Entry" {key=1: string, value=2}.
            entry = "".join(p.capitalize() for p in fname.split("_")) + "Entry"
            nested = msg.nested_type.add(name=entry)
            nested.options.map_entry = True
            nested.field.add(name="key", number=1, label=_F.LABEL_OPTIONAL, type=_F.TYPE_STRING)
            value = nested.field.add(name="value", number=2, label=_F.LABEL_OPTIONAL)
            _scalar_or_message(value, label)
            f.type, f.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{name}.{entry}"
        elif kind in ("MESSAGE", "ENUM"):
            assert ref is not None, fname
            _scalar_or_message(f, ref)
        else:
            _scalar_or_message(f, kind)
        if optional:  # proto3 optional: a synthetic one-field oneof "_<name>"
            oneof = "_" + fname
            f.proto3_optional = True
        if oneof is not None:
            if oneof not in oneofs:
                oneofs.append(oneof)
                msg.oneof_decl.add(name=oneof)
            f.oneof_index = oneofs.index(oneof)


def _build() -> dict[str, type]:
    fd = descriptor_pb2.FileDescriptorProto(name="signal_tinker.proto", package=PACKAGE,
                                            syntax="proto3")
    for name, values in _ENUMS.items():
        enum = fd.enum_type.add(name=name)
        for vname, number in values:
            enum.value.add(name=vname, number=number)
    for name, fields in _MESSAGES.items():
        _add_message(fd, name, fields)
    pool = descriptor_pool.DescriptorPool()  # our own: never clashes with another copy
    pool.Add(fd)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in _MESSAGES}


_CLASSES = _build()
ForwardBackwardRequest = _CLASSES["ForwardBackwardRequest"]
Tensor = _CLASSES["Tensor"]
ForwardBackwardOutput = _CLASSES["ForwardBackwardOutput"]
SampleResponse = _CLASSES["SampleResponse"]

DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32 = 1, 2, 3
STOP_REASON_STOP, STOP_REASON_LENGTH = 0, 1
