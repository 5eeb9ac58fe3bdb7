"""Import FFCV without its two process-wide side effects (docs/STACK.md, FFCV import):

- importing it sets torch to 1 thread for the whole process: the count is put back;
- ffcv.fields.rgb_image builds a module-level numba typed Dict of two image modes, which
  JIT-compiles the typed-dict machinery: ~7 s in every process that imports FFCV (each
  training run, Ray worker and test subprocess). The dict is only read from Python, so a
  plain dict is built instead while FFCV is imported; numba's own Dict is restored after.

Every module here that imports FFCV imports this first.
"""

import numba.typed
import torch

_threads = torch.get_num_threads()
_typed_dict = numba.typed.Dict
numba.typed.Dict = dict
try:
    import ffcv  # noqa: F401  (its fields, loader and writer)
finally:
    numba.typed.Dict = _typed_dict
    torch.set_num_threads(_threads)
