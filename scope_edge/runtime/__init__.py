"""The runtime under ScopeLlama and the server, one layer per module, bottom up:

    model.py       the llama_model: tokenizer, pieces, end tokens, chat template
    sampling.py    Sampling, llama.cpp's sampler chain and grammar sampler, logprobs
    sketch.py      Sketch (scoring from key sketches) and the bases' linear algebra
    sequence.py    SequenceCache: one sequence's cache, the protocol the layers above use
    context.py     a llama_context with our hook: decode, capture, evict, shift
    config.py      EngineConfig: how an engine runs a model, validated once
    calibrate.py   learning a sketch basis by decoding a calibration text
    cache.py       what the cache holds across calls (Session), sizing (Cache, Plan)
    grammar.py     GBNF for JSON objects, JSON schemas and tool calls (llama-cpp-python's converter)
    text.py        token bytes to streamed text, stop strings
    generation.py  one generation: start_generation (the one way one starts), prefill,
                   the decode loop, Chunk and stats
    batcher.py     one llama_decode per step for every running sequence (Batcher, SeqView)
    batch.py       requests on the slots of that shared context (BatchRunner: the server's engine)

A policy (scope_edge.policies) appears only in cache.py (a generation's
cells come from the policy's own counts) and generation.py (selection), and
sees only positions and scores there. Nothing here imports the facade, the
server or the CLI (tests/test_public_api.py checks the layers).
"""
