"""Installation of mmdwnet (use ``bash tools/install.sh`` to set up the whole stack)."""
import os.path as osp

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))


def get_version():
    scope = {}
    with open(osp.join(HERE, 'mmdwnet', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def parse_requirements(fname):
    with open(osp.join(HERE, 'requirements', fname)) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line]


class build_py_with_pth(build_py):
    """Also put ``mmdwnet-mim.pth`` at the top of the wheel (site-packages): it imports
    ``_mmdwnet_mim`` at start-up so that mmengine resolves ``mmdwnet::`` config paths.
    Editable installs get the file from ``python -m _mmdwnet_mim install``."""

    def run(self):
        super().run()
        with open(osp.join(self.build_lib, 'mmdwnet-mim.pth'), 'w') as f:
            f.write('import _mmdwnet_mim\n')

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [
            osp.join(self.build_lib, 'mmdwnet-mim.pth')
        ]


setup(
    name='mmdwnet',
    version=get_version(),
    description='Depth-wise convolution networks (DWNet, ICLR 2022) for '
    'MMPretrain, MMDetection and MMSegmentation',
    long_description=open(osp.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    license='Apache License 2.0',
    python_requires='>=3.8',
    packages=find_packages(exclude=('configs', 'tools', 'tests', 'demo')),
    py_modules=['_mmdwnet_mim'],
    # mmdwnet/.mim/configs links to configs/: `mim` and `mmdwnet::` inheritance read it
    package_data={'mmdwnet': [
        '.mim/configs/**/*.py', '.mim/configs/**/*.yml', '.mim/model-index.yml',
        'ops/csrc/*.cpp', 'ops/csrc/*.h'
    ]},
    cmdclass={'build_py': build_py_with_pth},
    install_requires=parse_requirements('runtime.txt'),
    extras_require={'tests': parse_requirements('tests.txt'),
                    'deploy': parse_requirements('deploy.txt'),
                    'analysis': parse_requirements('analysis.txt')},
    zip_safe=False,
)
