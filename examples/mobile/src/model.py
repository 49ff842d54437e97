"""The guide's model module: ``LeNet5`` for the mobile example (MindSpore's ``src/model.py`` layout).

The network lives in :mod:`flcluster.client.lenet`; this file only gives it the place the guide's scripts
expect (``from src.model import LeNet5``). ``LeNet5(62)`` has the original's eight tensors (66 404 floats);
:func:`~flcluster.client.lenet.make_lenet` builds one with seeded weights.
"""

from __future__ import annotations

from flcluster.client.lenet import LENET_TENSOR_ORDER, LeNet5, make_lenet

__all__ = ["LENET_TENSOR_ORDER", "LeNet5", "make_lenet"]
