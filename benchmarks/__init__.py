# A package, so its test modules (test_ops.py, ...) do not clash with tests/ under pytest's
# default import mode, and the repository root is on sys.path for glmix_kernels.
