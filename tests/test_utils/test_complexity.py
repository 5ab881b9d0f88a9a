"""FLOP counting rules of the operators (mmdwnet/utils/complexity.py)."""


def test_every_forward_idwconv_operator_has_a_flop_rule():
    """The FLOP counter knows every I-D-DW forward operator mmdwnet registers: one name per
    operator, whose CPU and CUDA (Triton) kernels are its backends, so that a model counts
    the same on any device; backward operators need no rule."""
    import torch

    import mmdwnet.ops  # noqa: F401  registers the operators
    from mmdwnet.utils.complexity import OP_HANDLES
    names = {f'mmdwnet::{name}' for name in dir(torch.ops.mmdwnet)
             if 'dwconv2d' in name and 'grad' not in name and 'backward' not in name}
    expected = {'mmdwnet::inhomogeneous_dwconv2d', 'mmdwnet::predicted_idwconv2d'}
    assert names == expected and names <= set(OP_HANDLES), (names, sorted(OP_HANDLES))
