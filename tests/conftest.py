import os

import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors; the variable must be
# set before triton is first imported. On a GPU machine it stays unset so Triton compiles.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
