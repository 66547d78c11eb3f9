"""The dry run's public names: ``vramplan.dry_run`` (the function) and ``vramplan.dryrun`` (its package)."""

import subprocess
import sys


def test_the_dryrun_package_is_a_plain_module_and_dry_run_its_function():
    code = ("import sys, types, vramplan\n"
            "f = vramplan.dry_run\n"
            "import vramplan.dryrun as pkg\n"
            "assert type(pkg) is types.ModuleType and not callable(pkg)\n"
            "assert vramplan.dryrun is pkg and f is pkg.dryrun is vramplan.dry_run\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dryrun_attribute_resolves_to_the_package_before_it_is_imported():
    code = "import vramplan, types; assert isinstance(vramplan.dryrun, types.ModuleType)"
    subprocess.run([sys.executable, "-c", code], check=True)
