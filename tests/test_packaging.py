"""The key-map tables ship inside the wheel: an installed wheel (not the source tree) finds and loads them."""
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_wheel_loads_every_table(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(dist.glob("lorabox-*.whl"))
    env = tmp_path / "venv"
    venv.create(env, with_pip=False, system_site_packages=True)  # numpy/click from the outer environment
    py = env / "bin" / "python"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import lorabox.keymap as k\n"
            "assert 'site' in str(k.key_maps_dir()), k.key_maps_dir()\n"
            "names = k.architecture_names()\n"
            "for a in names:\n"
            "    arch = k.load_architecture(a)\n"
            "    assert all(c.table.modules for c in arch.components.values())\n"
            "print(sorted(names), k.key_maps_dir())")
    proc = subprocess.run([str(py), "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    from lorabox.keymap import architecture_names

    assert str(sorted(architecture_names())) in proc.stdout  # the wheel carries every table of the source tree
