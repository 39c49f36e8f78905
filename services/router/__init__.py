"""router: the public face of specmesh (gRPC `specmesh.v1.Generation` + OpenAI-style HTTP).

    server.py      process entry point, gRPC servicer        http_api.py  OpenAI-style HTTP (aiohttp)
    pipeline.py    Router: the one path of every request     session.py   target stream, committed log
    request.py     validation + tokenization                 output.py    max_tokens / stop ids / text
    detokenizer.py incremental, UTF-8 safe                   stop.py      exact stop strings
    mesh.py        peers, pairs, error translation           pairing.py   per pair: channel, pools, reachability
    model_meta.py  tokenizer, vocab, EOS ids                 config.py    RouterConfig (flags / env)
    openai_schema.py  the HTTP bodies (pydantic), refusals
"""
