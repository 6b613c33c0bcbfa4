"""Stock kernelspecs and `relaykernel install`: valid for Jupyter and VS Code, and they select our provisioner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.provisioning import KernelProvisionerFactory

from relaykernel.cli import main
from relaykernel.common.errors import ConfigError
from relaykernel.kernelspec import PROVISIONER_NAME, build_kernel_json, check_kernel_json, install_kernelspec

STOCK = Path(__file__).resolve().parent.parent / "kernelspecs"
STOCK_NAMES = sorted(path.name for path in STOCK.iterdir())


def test_there_is_a_stock_spec_per_platform():
    assert {"colab", "aistudio", "kaggle", "generic"} <= set(STOCK_NAMES)


@pytest.mark.parametrize("name", STOCK_NAMES)
def test_stock_spec_installs_with_jupyter_and_selects_the_provisioner(name, tmp_path):
    spec = json.loads((STOCK / name / "kernel.json").read_text())
    assert check_kernel_json(spec, template=True) == []
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter",
            "kernelspec",
            "install",
            str(STOCK / name),
            "--prefix",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    installed = ksm.get_kernel_spec(name)
    assert KernelProvisionerFactory.instance().is_provisioner_available(installed)
    assert installed.metadata["kernel_provisioner"]["provisioner_name"] == PROVISIONER_NAME


def test_display_names_are_unique():
    names = [json.loads((STOCK / n / "kernel.json").read_text())["display_name"] for n in STOCK_NAMES]
    assert len(set(names)) == len(names)


def test_install_writes_an_absolute_python_and_the_config(tmp_path, capsys):
    code = main(
        [
            "install",
            "--name",
            "myvm",
            "--host",
            "colab",
            "--jump",
            "me@relay:2222",
            "--remote-python",
            "/opt/py/bin/python",
            "--remote-workdir",
            "/content/w",
            "--prefix",
            str(tmp_path),
        ]
    )
    assert code == 0
    spec = json.loads((tmp_path / "share/jupyter/kernels/myvm/kernel.json").read_text())
    assert spec["argv"][0] == sys.executable and Path(spec["argv"][0]).is_absolute()
    assert "{connection_file}" in spec["argv"]
    assert spec["interrupt_mode"] == "signal" and spec["language"] == "python"
    config = spec["metadata"]["kernel_provisioner"]["config"]
    assert config == {
        "host": "colab",
        "jump": "me@relay:2222",
        "remote_python": "/opt/py/bin/python",
        "remote_workdir": "/content/w",
    }
    assert "relaykernel doctor myvm --spec " in capsys.readouterr().out  # the spec: its host, jump, python, dir


def test_install_rejects_bad_input_with_a_fix(tmp_path, capsys):
    assert main(["install", "--name", "bad name", "--host", "x", "--prefix", str(tmp_path)]) == 1
    assert "letters, digits" in capsys.readouterr().err
    assert (
        main(["install", "--name", "ok", "--host", "x", "--lease-seconds", "0", "--prefix", str(tmp_path)])
        == 1
    )
    assert "lease_seconds" in capsys.readouterr().err


def test_display_name_must_be_unique(tmp_path):
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share/jupyter/kernels")])
    spec = build_kernel_json(display_name="Same", config={"host": "a"})
    install_kernelspec(name="one", kernel_json=spec, prefix=str(tmp_path), manager=ksm)
    with pytest.raises(ConfigError, match="already shows as"):
        install_kernelspec(name="two", kernel_json=spec, prefix=str(tmp_path), manager=ksm)


def test_check_names_every_vs_code_rule():
    spec = {"argv": ["python", "-m", "ipykernel_launcher", "{connection_file}", "{prefix}"], "language": "r"}
    problems = " ".join(check_kernel_json(spec))
    for fragment in ("argv[0]", "ipykernel", "{prefix}", "language", "interrupt_mode", "display_name",
                     "provisioner_name"):
        assert fragment in problems
    assert "{connection_file}" in " ".join(check_kernel_json({"argv": ["/py", "--f={connection_file}"]}))


def test_only_a_template_may_leave_python_to_jupyter():
    spec = build_kernel_json(display_name="x", config={"host": "a"}, python="python3")
    assert check_kernel_json(spec, template=True) == []
    assert any("absolute" in problem for problem in check_kernel_json(spec))


@pytest.mark.parametrize("name", STOCK_NAMES)
def test_install_from_a_stock_spec_makes_it_ready_for_vs_code(name, tmp_path, capsys):
    assert main(["install", "--from", str(STOCK / name), "--prefix", str(tmp_path)]) == 0
    installed = json.loads((tmp_path / "share/jupyter/kernels" / name / "kernel.json").read_text())
    stock = json.loads((STOCK / name / "kernel.json").read_text())
    assert installed["argv"][0] == sys.executable
    assert installed["argv"][1:] == stock["argv"][1:]
    assert installed["display_name"] == stock["display_name"]
    assert installed["metadata"] == stock["metadata"]
    assert check_kernel_json(installed) == []


def test_install_from_a_stock_spec_with_another_host_renames_it(tmp_path):
    args = ["install", "--from", str(STOCK / "colab"), "--name", "colab2", "--host", "colab2", "--prefix"]
    assert main([*args, str(tmp_path)]) == 0
    installed = json.loads((tmp_path / "share/jupyter/kernels/colab2/kernel.json").read_text())
    assert installed["display_name"] == "Python on colab2 (relaykernel)"
    assert installed["metadata"]["kernel_provisioner"]["config"]["remote_workdir_base"] == "/content/relaykernel"


def test_install_never_shadows_another_kernel(tmp_path):
    kernels = tmp_path / "share/jupyter/kernels"
    (kernels / "python3").mkdir(parents=True)
    (kernels / "python3/kernel.json").write_text(json.dumps({"argv": ["python3"], "display_name": "Python 3",
                                                              "language": "python"}))
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)])
    spec = build_kernel_json(display_name="Relay", config={"host": "a"})
    with pytest.raises(ConfigError, match="not a relaykernel spec"):
        install_kernelspec(name="python3", kernel_json=spec, prefix=str(tmp_path), manager=ksm)
    install_kernelspec(name="relay", kernel_json=spec, prefix=str(tmp_path), manager=ksm)
    install_kernelspec(name="relay", kernel_json=spec, prefix=str(tmp_path), manager=ksm)  # replacing itself is fine


def test_install_needs_a_host(tmp_path, capsys):
    assert main(["install", "--name", "x", "--prefix", str(tmp_path)]) == 1
    assert "--host" in capsys.readouterr().err


def test_the_launcher_does_not_import_what_only_other_commands_need():
    """`relaykernel launch` is a kernel's cold start: nbformat alone costs ~2 s to import (its schema checks)."""
    code = "import sys, relaykernel.cli; print(sorted({'nbformat', 'nbclient'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
