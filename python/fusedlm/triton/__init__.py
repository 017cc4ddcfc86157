"""Triton kernels, one file per op (attention.py, norm.py, adamw.py), registered as the
``"triton"`` backend in ``fusedlm.ops``. None have landed yet; ``fusedlm.backends()`` reports the
backend as having no kernels."""
