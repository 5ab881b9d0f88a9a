"""FLOP counting rules of the operators (mmdwnet/utils/complexity.py)."""


def test_every_forward_idwconv_operator_has_a_flop_rule():
    """The FLOP counter knows every I-D-DW forward operator mmdwnet registers, the CUDA
    (Triton) ones included, so that a model counts the same on any device; backward
    operators need no rule."""
    import torch

    import mmdwnet.ops  # noqa: F401  registers the operators
    from mmdwnet.utils.complexity import OP_HANDLES
    names = {f'mmdwnet::{name}' for name in dir(torch.ops.mmdwnet)
             if 'dwconv2d' in name and 'grad' not in name and 'backward' not in name}
    expected = {'mmdwnet::inhomogeneous_dwconv2d', 'mmdwnet::predicted_idwconv2d'}
    from mmdwnet.ops import triton_idwconv
    if triton_idwconv.triton is not None:
        expected |= {'mmdwnet::inhomogeneous_dwconv2d_triton',
                     'mmdwnet::predicted_idwconv2d_triton'}
    assert names == expected and names <= set(OP_HANDLES), (names, sorted(OP_HANDLES))
