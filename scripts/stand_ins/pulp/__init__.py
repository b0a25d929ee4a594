"""A stand-in for `pulp`, for running modelopt where pulp is not installed (the GPU machines).

modelopt 0.47 imports pulp at start-up for a search feature (AutoQuantize) that quantization never
calls; any attribute is a placeholder class. scripts/gpu_check.sh and scripts/make_kernel_vectors.py
put this folder on the path only when the real pulp is missing.
"""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {})
