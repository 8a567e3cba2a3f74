"""Serving: ``toprovar serve`` (Triton Inference Server with the model ``toprovar``), ``toprovar client`` and
the load generator of the serving benchmark.

- ``service``: request validation and batched generation for one model instance (no Triton);
- ``placement``: one instance per visible GPU (a pure function of the GPU count);
- ``triton_model``: the Triton Python-backend model (runs inside Triton);
- ``server``: the model repository and the ``tritonserver`` process;
- ``client``: HTTP/gRPC client and the closed-loop load generator.
"""
from __future__ import annotations

from .client import add_client_args, cmd_client
from .server import add_serve_args, cmd_serve

__all__ = ["add_client_args", "add_serve_args", "cmd_client", "cmd_serve"]
