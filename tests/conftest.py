import os

import torch

# Without a GPU the Triton kernels run under the interpreter on CPU tensors; the variable must be
# set before triton is first imported. On a GPU machine it stays unset so Triton compiles.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _skip_repatching_in_nested_calls():
    """Halves the interpreter's time on our kernels. Every call of a ``@triton.jit`` helper from
    inside a kernel re-patches all of ``triton.language`` (a scan of its members) though the
    kernel's launch has already patched it: our helpers live in the kernels' own module, so they
    see the same, already patched, ``tl``. Only calls of functions from that module skip it."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime.interpreter import InterpretedFunction, InterpreterError
    except ImportError:
        return
    original = InterpretedFunction.__call__
    if not hasattr(InterpretedFunction, "rewrite"):
        return

    def call(self, *args, **kwargs):
        if self.fn.__module__ != "glmix_kernels.backends.triton.kernels":
            return original(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise InterpreterError(repr(e)) from e

    InterpretedFunction.__call__ = call


_skip_repatching_in_nested_calls()
