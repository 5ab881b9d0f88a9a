"""Let mmengine resolve ``mmdwnet::`` config paths, e.g.
``_base_ = 'mmdwnet::mmdet/cascade_dwconv_t_3x.py'`` in a downstream project's config.

mmengine 0.10.x accepts ``PKG::path`` only for packages in its hard-coded
``mmengine.config.utils.MODULE2PACKAGE`` and then reads ``<package dir>/.mim/configs/path``,
where it finds the package directory from the distribution's install location - which is
not where an editable install's code lives. A config's ``custom_imports`` runs only after
``_base_`` is resolved, too late to help. So this module is imported at interpreter start by
``mmdwnet-mim.pth`` in site-packages. It imports nothing heavy: it waits until mmengine's two
modules are imported, then adds ``mmdwnet`` to ``MODULE2PACKAGE`` and makes the installed
path of ``mmdwnet`` the directory its code is imported from (``mmdwnet/.mim/configs`` links to
the repository's ``configs/``; wheels carry a copy). mim (``mim search mmdwnet``,
``mim train``) locates packages the same way and gets the same fix.

Wheels install the .pth file themselves; editable installs get it from
``python -m _mmdwnet_mim install`` (run by tools/install.sh).
"""
import importlib.abc
import importlib.util
import os.path as osp
import sys
import sysconfig

PTH_NAME = 'mmdwnet-mim.pth'
PTH_LINE = 'import _mmdwnet_mim\n'


def _package_dir(name: str = 'mmdwnet') -> str:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    return spec.submodule_search_locations[0]


def _patch_config_utils(module) -> None:
    module.MODULE2PACKAGE.setdefault('mmdwnet', 'mmdwnet')


def _patch_package_utils(module) -> None:
    original = module.get_installed_path

    def get_installed_path(package: str) -> str:
        if package == 'mmdwnet':
            return _package_dir()
        return original(package)

    get_installed_path.__doc__ = original.__doc__
    module.get_installed_path = get_installed_path


PATCHES = {
    'mmengine.config.utils': _patch_config_utils,
    'mmengine.utils.package_utils': _patch_package_utils,
    # mim (search, download, train) finds packages the same way, through the distribution.
    'mim.utils.utils': _patch_package_utils,
}


class _PostImportPatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of the modules in PATCHES so that their patch
    runs right after they execute."""

    def find_spec(self, name, path=None, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install_import_hook() -> None:
    pending = False
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            pending = True
    if pending and not any(isinstance(f, _PostImportPatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportPatcher())


def install_pth(site_dir: str = None) -> str:
    """Write ``mmdwnet-mim.pth`` into ``site_dir`` (default: this interpreter's purelib)."""
    site_dir = site_dir or sysconfig.get_paths()['purelib']
    path = osp.join(site_dir, PTH_NAME)
    with open(path, 'w') as f:
        f.write(PTH_LINE)
    return path


install_import_hook()

if __name__ == '__main__':
    if sys.argv[1:] != ['install']:
        sys.exit('usage: python -m _mmdwnet_mim install')
    print(f'wrote {install_pth()}')
