"""An OpenAI-compatible HTTP server in front of one LLMEngine.

    cli.py            `moeflow serve`: build the engine, run uvicorn     draining.py  SIGTERM: drain, then stop
    http.py           uvicorn's configuration, with a deadline for request headers
    guard.py          every request first: its id, body size and body time limits
    engine_client.py  the one thread that steps the engine, and the asyncio side of it
    app.py            the FastAPI app: routes, API key, models/health/tokenize/metrics
    routes.py         every route: JSON parsed off the loop, unexpected errors answered once
    offload.py        the CPU pool: tokenizing, logprobs and large responses off the event loop
    completions.py    /v1/completions      chat.py  /v1/chat/completions
    inputs.py         prompts, context limits and sampling params, checked before the engine sees them
    logprobs.py       logprobs in the legacy-completions and chat formats
    protocol.py       request and response models        fields.py  their strict types and bounds
    errors.py         OpenAI-style error bodies          responses.py  streams and whole responses
    metrics.py        Prometheus metrics, in a registry of the server's own
"""
