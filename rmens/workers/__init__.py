"""Scripts that run in another Python environment than rmens' own, started as subprocesses by path.

They import nothing from rmens (that environment need not have it installed) and are never imported by
rmens: rmens.vllm_engine runs vllm_worker.py with the vLLM environment's interpreter.
"""
