"""Choosing the CUDA compiler for mmcv's CUDA ops (tools/cuda_toolchain.py): pip packages
at torch's CUDA major.minor, never a newer minor, and an nvcc only where its release
matches."""
import os
import stat

import pytest
from cuda_toolchain import build_env, find_nvcc, main, pip_cuda_home, requirements


def test_torch_cuda_13_0_selects_13_0_packages():
    assert requirements('13.0') == [
        'nvidia-cuda-nvcc==13.0.*', 'nvidia-cuda-cccl==13.0.*', 'nvidia-cuda-crt==13.0.*',
        'nvidia-nvvm==13.0.*', 'nvidia-cuda-runtime==13.0.*'
    ]
    assert requirements('12.8')[0] == 'nvidia-cuda-nvcc-cu12==12.8.*'
    from packaging.specifiers import SpecifierSet
    spec = SpecifierSet(requirements('13.0')[0].split('==', 1)[1].join(['==', '']))
    assert '13.0.88' in spec and '13.0.0' in spec
    assert '13.1.0' not in spec and '13.5.37' not in spec and '12.9.1' not in spec
    with pytest.raises(ValueError, match=r"a CUDA version must look like MAJOR.MINOR, got 'x'"):
        requirements('x')


def _fake_nvcc(path, release):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write('#!/bin/sh\necho "Cuda compilation tools, release '
                f'{release}, V{release}.88"\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_only_an_nvcc_of_the_same_minor_is_taken(tmp_path, monkeypatch):
    site = tmp_path / 'site-packages'
    system = tmp_path / 'cuda-13.5' / 'bin' / 'nvcc'
    _fake_nvcc(str(system), '13.5')
    monkeypatch.setenv('CUDA_HOME', str(tmp_path / 'cuda-13.5'))
    monkeypatch.setenv('PATH', '/usr/bin:/bin')
    none = str(tmp_path / 'no-system-cuda')
    # a newer system toolkit does not count, and pip's is not installed yet
    assert find_nvcc('13.0', str(site), none) is None
    assert main(['find', '--cuda', '13.5']) == 0  # that one matches CUDA 13.5
    pip_nvcc = os.path.join(pip_cuda_home('13.0', str(site)), 'bin', 'nvcc')
    assert pip_nvcc == str(site / 'nvidia' / 'cu13' / 'bin' / 'nvcc')
    _fake_nvcc(pip_nvcc, '13.0')
    assert find_nvcc('13.0', str(site), none) == pip_nvcc
    env = build_env(pip_nvcc, '13.0', str(site), cache=str(tmp_path / 'cache'))
    assert env['CUDA_HOME'] == str(site / 'nvidia' / 'cu13')
    assert env['PATH'].startswith(str(site / 'nvidia' / 'cu13' / 'bin') + ':')
    # the linker's -lcudart: pip's tree has only libcudart.so.13
    links = tmp_path / 'cache' / 'mmdwnet' / 'cuda-13.0-link'
    assert env['LIBRARY_PATH'].split(':')[:2] == [str(links), str(site / 'nvidia' / 'cu13' /
                                                                  'lib')]
    assert os.readlink(links / 'libcudart.so') == str(site / 'nvidia' / 'cu13' / 'lib' /
                                                      'libcudart.so.13')
    # a matching system toolkit comes first
    _fake_nvcc(str(system), '13.0')
    assert find_nvcc('13.0', str(site), none) == str(system)
