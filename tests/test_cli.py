"""What every command shares (fastdiff.cli and fastdiff.cli.common): the device check, --version and --help,
missing network files, --interval-steps, and CFG's refusal of an untrained null label."""

from __future__ import annotations

import os

import pytest
import torch

from fastdiff.cli import generate as gen_cli
from fastdiff.cli import main
from fastdiff.io import save_network
from fastdiff.sampling import CFG, Interval, generate_images

from conftest import cli_args, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")

# One command line per command that takes --device; each must fail before it does any work.
DEVICE_COMMANDS = [
    ["generate", "--net", "n.safetensors", "--outdir", "o"],
    ["info"],
    ["demo"],
    ["train", "--outdir", "o", "--data", "builtin:digits"],
    ["metrics", "calc", "--images", "a", "--ref", "b"],
    ["bench"],
    ["phema", "--indir", "a", "--outstd", "0.1", "--outdir", "b"],
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("argv", DEVICE_COMMANDS, ids=lambda a: a[0])
def test_device_cuda_without_cuda_is_one_clear_error(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastdiff {argv[0]}: error: --device cuda: no CUDA GPU is available")
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize("bad", ["gpu", "cuda:x"])
def test_device_malformed_is_an_error(bad, capsys):
    assert main(["info", "--device", bad]) == 2
    assert "not a device name" in capsys.readouterr().err


def test_version_and_help(capsys):
    import fastdiff

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"fastdiff {fastdiff.__version__}"
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "generate" in out and "``" not in out


def test_generate_missing_network_file(tmp_path, capsys):
    argv = ["--outdir", tmp_path / "o", "--device", "cpu", "--no-progress"]
    assert gen_cli.main(cli_args(gen_cli, "--net", tmp_path / "nope.safetensors", *argv)) == 2
    assert f"--net {tmp_path / 'nope.safetensors'}: not found" in capsys.readouterr().err
    (tmp_path / "net.safetensors").write_bytes(b"")  # checked before anything is loaded
    assert gen_cli.main(cli_args(gen_cli, "--net", tmp_path / "net.safetensors", "--gnet", tmp_path, "--guidance",
                                 "2", *argv)) == 2
    assert "is a folder, not a network file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """A tiny class-conditional network file recording label dropout 0, and one recording 0.1."""
    folder = tmp_path_factory.mktemp("nets")
    net = tiny_net(model_channels=16, logvar_channels=16)
    paths = {p: folder / f"net-{p}.safetensors" for p in (0.0, 0.1)}
    for p, path in paths.items():
        save_network(net, path, extra={"kind": "ema", "label_dropout": p})
    return net.eval().requires_grad_(False), paths


COMMON = ("--seeds", "0-2", "--batch", "3", "--steps", "4", "--device", "cpu", "--no-progress")


def _pngs(folder):
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_interval_steps_is_interval_of_steps(nets, tmp_path, capsys):
    import numpy as np

    net, paths = nets
    out = tmp_path / "cli"
    argv = ("--net", paths[0.1], "--guidance-method", "cfg", "--guidance", "3", "--interval-steps", "1,2",
            "--outdir", out, *COMMON)
    assert gen_cli.main(cli_args(gen_cli, *argv)) == 0
    assert "interval steps 1..2" in capsys.readouterr().err
    want = [img for _, batch in generate_images(net, range(3), steps=4, batch=3, device="cpu",
                                                guidance=Interval(CFG(3.0), steps=(1, 2)))
            for img in batch.permute(0, 2, 3, 1).numpy()]
    got = _pngs(out)
    assert len(got) == 3 and all(np.array_equal(g, w) for g, w in zip(got, want))
    unguided = [img for _, batch in generate_images(net, range(3), steps=4, batch=3, device="cpu")
                for img in batch.permute(0, 2, 3, 1).numpy()]
    assert not all(np.array_equal(g, u) for g, u in zip(got, unguided))
    for flags, message in [(("--interval-steps", "2,1"), "first <= last"), (("--interval-steps", "x"), "malformed"),
                           (("--interval-steps", "4,5"), "no step would be guided"),
                           (("--interval-steps", "1,2", "--interval", "0.3,5"), "not both")]:
        argv = ("--net", paths[0.1], "--guidance-method", "cfg", "--guidance", "3", *flags, "--outdir", out, *COMMON)
        assert gen_cli.main(cli_args(gen_cli, *argv)) == 2
        assert message in capsys.readouterr().err


def test_cfg_refuses_a_null_label_trained_without_label_dropout(nets, tmp_path, capsys):
    _, paths = nets
    argv = ("--guidance-method", "cfg", "--guidance", "2", "--outdir", tmp_path / "o", *COMMON)
    assert gen_cli.main(cli_args(gen_cli, "--net", paths[0.0], *argv)) == 2
    err = capsys.readouterr().err
    assert "trained without label dropout" in err and "--force" in err and not (tmp_path / "o").exists()
    assert gen_cli.main(cli_args(gen_cli, "--net", paths[0.0], *argv, "--force")) == 0
    assert "warning:" in capsys.readouterr().err and len(list((tmp_path / "o").glob("*.png"))) == 3
    assert gen_cli.main(cli_args(gen_cli, "--net", paths[0.1], *argv, "--outdir", tmp_path / "p")) == 0
    assert "label dropout" not in capsys.readouterr().err


def test_guidance_flags_come_from_the_classes():
    """Each guidance class declares its parameters (defaults = its constructor's, weight first); the methods
    and the --<method>-<param> flags of every command are built from those declarations."""
    import argparse
    import inspect

    from fastdiff.cli.common import GUIDANCE_METHODS, add_guidance_arguments
    from fastdiff.sampling.guidance import CADS, METHODS

    assert GUIDANCE_METHODS == ("auto", "cfg", "autoguidance", "apg", "icg", "tsg")
    for cls in (*METHODS.values(), CADS):
        signature = inspect.signature(cls).parameters
        assert [p.name for p in cls.params if signature[p.name].default != p.default] == [], cls
        assert cls is CADS or next(iter(signature)) == "weight", cls
    parser = argparse.ArgumentParser()
    add_guidance_arguments(parser)
    flags = {o for a in parser._actions for o in a.option_strings if o.startswith(("--apg-", "--tsg-", "--cads-"))}
    assert flags == {"--apg-eta", "--apg-momentum", "--apg-rescale", "--tsg-scale", "--tsg-c-noise-scale",
                     "--cads-tau1", "--cads-tau2", "--cads-s", "--cads-psi"}
    from fastdiff.sampling import Autoguidance

    with pytest.raises(TypeError, match="weight comes first"):
        Autoguidance(lambda x, sigma, labels: x, 2.0)


# The layers of README.md's Architecture section, bottom (0) to top: a module may import only from its own
# package and from packages of a lower rank.
LAYERS = {
    "_C": 0, "_build": 0, "_build_info": 0, "_runtime": 0, "_atomic": 0, "_dist": 0, "__version__": 0,
    "_images": 0.5,  # PNGs written atomically (_atomic)
    "ops": 1, "diffusion": 2, "nn": 3, "data": 3,
    "io": 3.5,  # network files and the official-pickle importer: builds nn networks, used by training
    "sampling": 4, "training": 4, "metrics": 4, "toy": 4, "vae": 4,
    "bench": 5, "interop": 5, "compat": 5, "diffusers": 5,
    "experiments": 5,  # the sweep and the demo: the library used as a user would, below their thin commands
    "cli": 6, "__main__": 7, "__init__": 7,
}


def _fastdiff_imports():
    """(package, module path, imported fastdiff package or stdlib module name) for every import in fastdiff/."""
    import ast
    import os

    import fastdiff

    top = os.path.dirname(fastdiff.__file__)
    for folder, _, files in os.walk(top):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, top)
            pkg = rel.split(os.sep)[0] if os.sep in rel else rel[:-3]
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        yield pkg, rel, alias.name
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    if node.module == "fastdiff":
                        for alias in node.names:
                            yield pkg, rel, f"fastdiff.{alias.name}"
                    else:
                        yield pkg, rel, node.module


def test_layering_argparse_and_commands():
    for pkg, rel, mod in _fastdiff_imports():
        if mod == "argparse":
            assert pkg == "cli", f"{rel}: a library module imports argparse"
        if not mod.startswith("fastdiff."):
            continue
        target = mod.split(".")[1]
        if target != pkg:
            assert LAYERS[target] < LAYERS[pkg], f"{rel} imports {mod}: {target} is not below {pkg}"
        if pkg == "cli" and target == "cli" and rel != os.path.join("cli", "__init__.py"):
            assert mod == "fastdiff.cli.common", f"{rel} imports another command module ({mod})"


def test_only_fastdiff_ops_touches_its_private_modules_and_the_custom_ops():
    """Outside ``fastdiff/ops`` the library uses the public ``fastdiff.ops`` API only: no import of a private
    ``fastdiff.ops._*`` module, no ``torch.ops.fastdiff`` call, no ``ops._name`` attribute (README.md,
    Architecture)."""
    import ast

    import fastdiff

    top = os.path.dirname(fastdiff.__file__)
    bad = []
    for folder, _, files in os.walk(top):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, top)
            if not name.endswith(".py") or rel.startswith("ops" + os.sep):
                continue
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    bad += [f"{rel}: import {a.name}" for a in node.names if a.name.startswith("fastdiff.ops._")]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    if node.module.startswith("fastdiff.ops._"):
                        bad.append(f"{rel}: from {node.module} import ...")
                    elif node.module == "fastdiff.ops":
                        bad += [f"{rel}: from fastdiff.ops import {a.name}" for a in node.names if a.name.startswith("_")]
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
                    inner = node.value
                    if isinstance(inner.value, ast.Name) and (inner.value.id, inner.attr, node.attr) == ("torch", "ops", "fastdiff"):
                        bad.append(f"{rel}:{node.lineno}: torch.ops.fastdiff")
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    if node.value.id in ("ops", "_ops", "_fops") and node.attr.startswith("_") and not node.attr.startswith("__"):
                        bad.append(f"{rel}:{node.lineno}: {node.value.id}.{node.attr}")
    assert bad == [], bad
