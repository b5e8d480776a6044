"""zoo inside other engines: ``vllm`` (a vLLM plugin: pruned serving). The lmms-eval backend is
``zoocli.lmms_eval_model`` (lmms-eval loads it by that path through its entry point)."""
