"""The runtime under ScopeLlama, one layer per module, bottom up:

    model.py       the llama_model: tokenizer, pieces, end tokens, chat template
    context.py     a llama_context with our hook: decode, capture, evict, shift
    cache.py       what the cache holds across calls (Session) and sizing (Cache)
    sampling.py    Sampling, llama.cpp's sampler chain and grammar sampler, logprobs
    grammar.py     GBNF for JSON objects, JSON schemas and tool calls (llama-cpp-python's converter)
    text.py        token bytes to streamed text, stop strings
    generation.py  one generation: prefill, the decode loop, Chunk and stats

A policy (scope_edge.policies) never appears below generation.py, and sees
only positions and scores there.
"""
