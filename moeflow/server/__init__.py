"""An OpenAI-compatible HTTP server in front of one LLMEngine.

    cli.py            `moeflow serve`: build the engine, run uvicorn, drain on SIGTERM
    engine_client.py  the one thread that steps the engine, and the asyncio side of it
    app.py            the FastAPI app: routes, API key, models/health/tokenize/metrics
    completions.py    /v1/completions      chat.py  /v1/chat/completions
    inputs.py         prompts, context limits and sampling params, checked before the engine sees them
    logprobs.py       logprobs in the legacy-completions and chat formats
    protocol.py       request and response models        errors.py  OpenAI-style error bodies
    metrics.py        Prometheus metrics, in a registry of the server's own
"""
