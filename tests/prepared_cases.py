"""Malformed PreparedPrompts, one broken rule each: the cases every validator of prepared prompts
must refuse (tests/test_prepared.py without an engine, tests/test_end_to_end.py through the tier)."""
from __future__ import annotations

from kimivl.v1 import types_pb2


def mutations(p: types_pb2.PreparedPrompt):
    """(name, mutate(prompt), expected message fragment) — each breaks one rule."""
    def m(fn):
        def apply():
            q = types_pb2.PreparedPrompt()
            q.CopyFrom(p)
            fn(q)
            return q
        return apply

    img0 = p.images[0]
    off, n = img0.placeholder_offset, img0.placeholder_length
    return [
        ("short data", m(lambda q: setattr(q.images[0].pixel_values, "data", q.images[0].pixel_values.data[:-2])),
         "prompt.images[0].pixel_values.data is"),
        ("wrong shape", m(lambda q: q.images[0].pixel_values.shape.__setitem__(0, 4)),
         "prompt.images[0].pixel_values.shape"),
        ("float32 label on bf16 bytes", m(lambda q: setattr(q.images[0].pixel_values, "dtype",
                                                           types_pb2.TENSOR_DTYPE_FLOAT32)),
         "prompt.images[0].pixel_values.data is"),
        ("uint8 label on bf16 bytes", m(lambda q: setattr(q.images[0].pixel_values, "dtype",
                                                         types_pb2.TENSOR_DTYPE_UINT8)),
         "prompt.images[0].pixel_values.data is"),
        ("placeholder too long", m(lambda q: setattr(q.images[0], "placeholder_length", n + 4)),
         "prompt.images[0].placeholder_length"),
        ("run longer than the placeholder", m(lambda q: q.token_ids.insert(off, q.token_ids[off])),
         "longer than placeholder_length"),
        ("offset off by one", m(lambda q: setattr(q.images[0], "placeholder_offset", off + 1)),
         "prompt.images[0]"),
        ("odd grid", m(lambda q: setattr(q.images[0], "grid_height", q.images[0].grid_height + 1)),
         "multiples of 2x2"),
        ("token out of vocabulary", m(lambda q: q.token_ids.__setitem__(0, 10**9)), "prompt.token_ids[0]"),
        ("stray pad token", m(lambda q: q.token_ids.append(q.token_ids[off])), "every pad token must belong"),
        ("no hash", m(lambda q: setattr(q.images[0], "content_hash", "")), "content_hash"),
        ("too many images", m(lambda q: [q.images.append(q.images[0]) for _ in range(8)]), "the limit is 8"),
        ("empty prompt", m(lambda q: (q.ClearField("token_ids"), q.ClearField("images"))), "token_ids is empty"),
    ]
