"""Public ops, one sub-package per family (reference.py beside the op's dispatch and autograd)."""
