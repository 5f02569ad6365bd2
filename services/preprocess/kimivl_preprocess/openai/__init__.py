"""The front door's OpenAI-compatible HTTP port (transport only; chats run through ChatFlow).

* :mod:`.request` — an OpenAI chat completion body to the domain's ChatRequest.
* :mod:`.render` — the reply as ``chat.completion`` JSON or SSE ``chat.completion.chunk`` events.
* :mod:`.errors` — RequestError and gRPC statuses as OpenAI's error JSON and HTTP statuses.
* :mod:`.server` — the aiohttp app: routes, API keys, body limit, drain, metrics.
"""
