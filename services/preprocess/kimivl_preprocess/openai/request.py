"""An OpenAI Chat Completions request body (parsed JSON) to the domain's ChatRequest.

Only shape and type are checked here; ranges and limits stay the domain's (``check_sampling``,
the pipeline), so both ports refuse the same things with the same messages. Those messages
name proto fields (``conversation.messages[0].content[1].image.data_uri``); :meth:`Mapped.
translate` rewrites them into the paths of the request the client sent
(``messages[0].content[1].image_url.url``).

Every field is supported, harmless metadata (listed in ``METADATA``) or refused with a 400
naming it. A field of a feature we do not have is accepted only with the value that asks for
nothing (``n: 1``, ``logprobs: false``, ``tools: []``, …: ``OFF_VALUES``), so nothing a
client asks for is silently ignored.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from kimivl.v1 import chat_pb2, types_pb2
from kimivl_contract.errors import RequestError

ROLES = {"system": types_pb2.ROLE_SYSTEM, "developer": types_pb2.ROLE_SYSTEM, "user": types_pb2.ROLE_USER,
         "assistant": types_pb2.ROLE_ASSISTANT}
MAX_UINT32 = (1 << 32) - 1
MAX_UINT64 = (1 << 64) - 1
MAX_REQUEST_ID_CHARS = 256

# Accepted and unused: they describe the caller, not the completion.
METADATA = {
    "user": "end-user id (OpenAI uses it for abuse monitoring)",
    "metadata": "tags for stored completions (nothing is stored)",
    "safety_identifier": "end-user id (OpenAI's successor of user)",
    "prompt_cache_key": "a prefix-cache routing hint (the engine's prefix cache needs none)",
}
# Features we do not have: these values (or null) ask for nothing and are accepted.
OFF_VALUES = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},), "tools": ([],),
    "tool_choice": ("none",), "parallel_tool_calls": (True, False), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "modalities": (["text"],), "audio": (), "prediction": (),
    "web_search_options": (), "reasoning_effort": (), "store": (False,), "service_tier": ("auto", "default"),
    "verbosity": (), "echo": (False,), "skip_special_tokens": (True,), "add_generation_prompt": (True,),
    "continue_final_message": (False,), "add_special_tokens": (False,), "min_tokens": (0,),
    "use_beam_search": (False,), "priority": (0,), "return_token_ids": (False,),
}
HINTS = {
    "n": "one choice per request; send n requests",
    "reasoning_effort": "use thinking_token_budget to bound thinking",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
}
MESSAGE_KEYS = {"role", "content", "name", "reasoning_content", "reasoning", "tool_calls", "function_call", "refusal",
                "audio", "tool_call_id"}


# A proto field path in a domain message (what RequestError messages start with or mention).
_PROTO_PATH = re.compile(
    r"\bconversation(?:\.messages(?:\[(?P<i>\d+)\](?:(?P<role>\.role)|\.content\[(?P<j>\d+)\]"
    r"(?P<tail>\.image(?:\.(?:data_uri|url|data))?|\.text)?)?)?|(?!\w))"
    r"|sampling\.(?P<name>[a-z_]+)(?:\[(?P<k>\d+)\])?|thinking\.max_thinking_tokens")


@dataclass
class Mapped:
    """The domain request and what the transport needs besides it."""
    request: chat_pb2.ChatRequest
    model: str
    stream: bool = False
    include_usage: bool = False
    show_reasoning: bool = True
    # How the client wrote what the paths name: messages whose content was a string,
    # the name of max_tokens it used, whether stop was a string.
    string_content: set[int] = field(default_factory=set)
    max_tokens_name: str = "max_completion_tokens"
    stop_string: bool = False

    def _client_path(self, m: re.Match) -> str:
        if m.group(0).startswith("conversation"):  # the whole conversation, as a limit names it, is messages
            i, j, tail = m.group("i"), m.group("j"), m.group("tail") or ""
            if i is None:
                return "messages"
            if m.group("role"):
                return f"messages[{i}].role"
            if j is None:
                return f"messages[{i}]"
            if tail.startswith(".image"):
                return f"messages[{i}].content[{j}].image_url.url"
            if int(i) in self.string_content:
                return f"messages[{i}].content"
            return f"messages[{i}].content[{j}]{tail}"
        if m.group(0).startswith("thinking."):
            return "thinking_token_budget"
        name, k = m.group("name"), m.group("k")
        if name == "max_tokens":
            name = self.max_tokens_name
        if k is None or (name == "stop" and self.stop_string):
            return name
        return f"{name}[{k}]"

    def translate(self, message: str) -> str:
        """``message`` with the domain's proto field paths replaced by the client's."""
        return _PROTO_PATH.sub(self._client_path, message)

    def param(self, proto_field: str | None, message: str = "") -> str | None:
        """The client's path of the field an error names: its ``field``, else the first field
        path in its (untranslated) ``message``."""
        if proto_field:
            return self.translate(proto_field)
        m = _PROTO_PATH.search(message)
        return self._client_path(m) if m else None


def _error(message: str, param: str | None) -> RequestError:
    return RequestError(message, field=param)


def _type_name(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _number(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _error(f"{key} must be a number, not {_type_name(v)}", key)
    return float(v)


def _int(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _error(f"{key} must be an integer, not {_type_name(v)}", key)
    if not lo <= v <= hi:
        raise _error(f"{key} is {v}; allowed range is [{lo}, {hi}]", key)
    return v


def _bool(body: dict, key: str) -> bool | None:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise _error(f"{key} must be a boolean, not {_type_name(v)}", key)
    return v


def _image(part: dict, path: str, image: types_pb2.Image) -> None:
    iu = part.get("image_url")
    if not isinstance(iu, dict):
        raise _error(f"{path}.image_url must be an object {{\"url\": ...}}, not {_type_name(iu)}", f"{path}.image_url")
    extra = sorted(set(iu) - {"url", "detail"})
    if extra:
        raise _error(f"{path}.image_url.{extra[0]} is not supported", f"{path}.image_url.{extra[0]}")
    url = iu.get("url")
    if not isinstance(url, str) or not url:
        raise _error(f"{path}.image_url.url must be a non-empty string (an http(s) URL or a data: URI)",
                     f"{path}.image_url.url")
    detail = iu.get("detail")
    if detail not in (None, "auto", "high"):
        raise _error(f"{path}.image_url.detail is {detail!r}; images are processed at full resolution (up to the "
                     "model's token limit): use \"auto\" or \"high\"", f"{path}.image_url.detail")
    if url.startswith("data:"):
        image.data_uri = url  # set in place: an Image built apart would be copied again (a photo's MBs)
    else:
        image.url = url


def _content(msg: dict, i: int, proto: types_pb2.Message, mapped: Mapped) -> None:
    path = f"messages[{i}].content"
    content = msg.get("content")
    if isinstance(content, str):
        proto.content.add(text=content)
        mapped.string_content.add(i)
        return
    if content is None:
        raise _error(f"{path} is required (tool calls are not supported)", path)
    if not isinstance(content, list):
        raise _error(f"{path} must be a string or an array of content parts, not {_type_name(content)}", path)
    for j, part in enumerate(content):
        ppath = f"{path}[{j}]"
        if not isinstance(part, dict):
            raise _error(f"{ppath} must be an object, not {_type_name(part)}", ppath)
        kind = part.get("type")
        if kind == "text":
            extra = sorted(set(part) - {"type", "text"})
            if extra:
                raise _error(f"{ppath}.{extra[0]} is not supported", f"{ppath}.{extra[0]}")
            text = part.get("text")
            if not isinstance(text, str):
                raise _error(f"{ppath}.text must be a string, not {_type_name(text)}", f"{ppath}.text")
            proto.content.add(text=text)
        elif kind == "image_url":
            extra = sorted(set(part) - {"type", "image_url"})
            if extra:
                raise _error(f"{ppath}.{extra[0]} is not supported", f"{ppath}.{extra[0]}")
            _image(part, ppath, proto.content.add().image)
        else:
            raise _error(f"{ppath}.type is {kind!r}; supported content parts are \"text\" and \"image_url\"",
                         f"{ppath}.type")


def _messages(body: dict, conv: types_pb2.Conversation, mapped: Mapped) -> None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _error(f"messages must be an array of messages, not {_type_name(messages)}", "messages")
    for i, msg in enumerate(messages):
        path = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _error(f"{path} must be an object, not {_type_name(msg)}", path)
        role = msg.get("role")
        if role in ("tool", "function"):
            raise _error(f"{path}.role is {role!r}: tool calling is not supported", f"{path}.role")
        if role not in ROLES:
            raise _error(f"{path}.role is {role!r}; expected one of {', '.join(map(repr, ROLES))}", f"{path}.role")
        for key in sorted(set(msg) - {"role", "content"}):
            if key not in MESSAGE_KEYS:
                raise _error(f"{path}.{key} is not a message field", f"{path}.{key}")
            value = msg[key]
            if value is None or value == []:
                continue
            if key in ("reasoning_content", "reasoning") and role == "assistant":
                continue  # an earlier turn's thinking: not fed back, as the model's chat template does
            raise _error(f"{path}.{key} is not supported", f"{path}.{key}")
        proto = conv.messages.add(role=ROLES[role])
        _content(msg, i, proto, mapped)


def _stop(body: dict, sampling: types_pb2.SamplingParameters, mapped: Mapped) -> None:
    stop = body.get("stop")
    if stop is None:
        return
    if isinstance(stop, str):
        stop = [stop]
        mapped.stop_string = True
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise _error("stop must be a string or an array of strings", "stop")
    sampling.stop.extend(stop)


def _refuse_unsupported(body: dict) -> None:
    for key in body:
        if key in SUPPORTED:
            continue
        value = body[key]
        if key in METADATA:
            if not isinstance(value, (str, dict, type(None))):
                raise _error(f"{key} must be a string or an object, not {_type_name(value)}", key)
            continue
        if key in OFF_VALUES:
            if value is None or any(value == off and type(value) is type(off) for off in OFF_VALUES[key]):
                continue
            hint = HINTS.get(key, "not supported by this server")
            raise _error(f"{key} is not supported ({hint})", key)
        raise _error(f"{key} is not a field this server knows", key)


SUPPORTED = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "stop", "seed", "frequency_penalty", "presence_penalty", "top_k", "repetition_penalty",
             "ignore_eos", "thinking_token_budget", "include_reasoning", "request_id"}


def to_chat_request(body, served_models: list[str], *, request_id: str | None = None) -> Mapped:
    """The ChatRequest for an OpenAI chat completion ``body``. RequestError (with ``field`` set to
    the body's path) for a malformed or unsupported request; LookupError for an unknown model."""
    if not isinstance(body, dict):
        raise _error(f"the request body must be a JSON object, not {_type_name(body)}", None)
    _refuse_unsupported(body)
    model = body.get("model")
    if model is None:
        model = served_models[0]
    elif not isinstance(model, str):
        raise _error(f"model must be a string, not {_type_name(model)}", "model")
    elif model not in served_models:
        raise LookupError(model)

    req = chat_pb2.ChatRequest()
    mapped = Mapped(req, model)
    req.conversation.SetInParent()  # the input is a conversation even when it has no messages
    _messages(body, req.conversation, mapped)

    s = req.sampling
    max_new = _int(body, "max_completion_tokens", 0, MAX_UINT32)
    legacy = _int(body, "max_tokens", 0, MAX_UINT32)
    if max_new is not None and legacy is not None and max_new != legacy:
        raise _error(f"max_completion_tokens ({max_new}) and max_tokens ({legacy}) differ; give one "
                     "(max_tokens is OpenAI's deprecated name)", "max_tokens")
    if max_new is not None or legacy is not None:
        s.max_tokens = max_new if max_new is not None else legacy
        mapped.max_tokens_name = "max_completion_tokens" if max_new is not None else "max_tokens"
    for key in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
        v = _number(body, key)
        if v is not None:
            setattr(s, key, v)
    top_k = _int(body, "top_k", -1, MAX_UINT32)
    if top_k is not None and top_k > 0:  # -1 and 0 disable it, as in vLLM
        s.top_k = top_k
    seed = _int(body, "seed", 0, MAX_UINT64)
    if seed is not None:
        s.seed = seed
    _stop(body, s, mapped)
    if _bool(body, "ignore_eos"):
        s.ignore_eos = True

    budget = _int(body, "thinking_token_budget", -1, MAX_UINT32)
    if budget is not None and budget != -1:  # -1: no budget, as in vLLM
        req.thinking.max_thinking_tokens = budget
    mapped.show_reasoning = _bool(body, "include_reasoning") is not False
    req.thinking.exclude_thinking = not mapped.show_reasoning

    rid = body.get("request_id", request_id)
    if rid is not None:
        if not isinstance(rid, str) or len(rid) > MAX_REQUEST_ID_CHARS:
            raise _error(f"request_id must be a string of at most {MAX_REQUEST_ID_CHARS} characters", "request_id")
        req.request_id = rid

    mapped.stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not mapped.stream:
            raise _error("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise _error(f"stream_options must be an object, not {_type_name(options)}", "stream_options")
        for key, value in options.items():
            if key == "include_usage":
                if not isinstance(value, (bool, type(None))):
                    raise _error("stream_options.include_usage must be a boolean", "stream_options.include_usage")
                mapped.include_usage = bool(value)
            elif not (key == "continuous_usage_stats" and not value):
                raise _error(f"stream_options.{key} is not supported", f"stream_options.{key}")
    return mapped
