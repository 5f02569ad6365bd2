"""The contract's own promises, checked on the generated descriptors."""
from __future__ import annotations

from kimivl.v1 import chat_pb2, inference_pb2


def _layout(descriptor) -> list[tuple]:
    return [(f.number, f.name, f.type, f.message_type.full_name if f.message_type else None,
             f.containing_oneof.name if f.containing_oneof else None) for f in descriptor.fields]


def test_chat_and_generate_responses_share_one_wire_layout():
    # The front door relays GenerateResponse bytes as ChatResponse (kimivl_preprocess.chat):
    # the day the two messages drift apart, this fails.
    assert _layout(chat_pb2.ChatResponse.DESCRIPTOR) == _layout(inference_pb2.GenerateResponse.DESCRIPTOR)
    delta = inference_pb2.GenerateResponse(delta={"thinking": "t", "answer": "a", "token_ids": [1, 2]})
    assert chat_pb2.ChatResponse.FromString(delta.SerializeToString()).delta.answer == "a"
