"""vllm.platforms' current_platform, as the worker asks it which device the engine runs on."""


class _Cpu:
    def is_cpu(self) -> bool:
        return True


current_platform = _Cpu()
