import json
import os
from types import SimpleNamespace

from tests.helpers import call_main, make_net, run_cli


def test_inspect_json_and_plot(tmp_path):
    net = make_net()
    net.provenance = {"source": "digits-pmd", "method": "cmwnet"}
    net.save_pretrained(tmp_path / "n")
    out = run_cli("inspect", "--weights", str(tmp_path / "n"), "--json", "--plot", str(tmp_path / "c.png"))
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["config"]["centers"] == net.centers
    assert info["config"]["provenance"]["source"] == "digits-pmd"
    assert [f["name"] for f in info["families"]] == ["small", "medium", "large"]
    expected = net.curves([0.0, 1.0])
    assert abs(info["curves"]["large"]["1"] - expected[2, 1]) < 1e-3
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_text(tmp_path, capsys):
    make_net().save_pretrained(tmp_path / "n")
    out = _main(capsys, "inspect", "--weights", str(tmp_path / "n"))
    assert out.returncode == 0 and "weight vs loss" in out.stdout and "head 2  large" in out.stdout


def _assert_one_line_error(out, needle):
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def _main(capsys, *args):
    code, out, err = call_main(list(args), capsys)
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_bad_inputs_exit_2(tmp_path, capsys):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _assert_one_line_error(_main(capsys, "inspect", "--weights", str(tmp_path / "empty.safetensors")), "is empty")
    _assert_one_line_error(_main(capsys, "inspect", "--weights", "hub:nope"), "malformed hub spec")
    _assert_one_line_error(_main(capsys, "inspect", "--weights", "pretrained:nope"), "unknown pretrained net")
    _assert_one_line_error(_main(capsys, "inspect"), "Missing option '--weights'")
    _assert_one_line_error(_main(capsys, "inspect", "--weights", str(tmp_path), "--bogus"), "No such option")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    _assert_one_line_error(run_cli("inspect", "--weights", "hub:org/absent", env=env), "not in the local Hugging")


def test_push_refuses_broken_artifact_and_offline(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    out = _main(capsys, "push", "--weights", str(tmp_path / "d"), "--repo", "org/x")
    _assert_one_line_error(out, "no weights file")
    make_net().save_pretrained(tmp_path / "n")
    _assert_one_line_error(_main(capsys, "push", "--weights", str(tmp_path / "n"), "--repo", "bad"), "org/name")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = run_cli("push", "--weights", str(tmp_path / "n"), "--repo", "org/x", env=env)
    assert out.returncode == 2 and out.stderr.startswith("error: ")


def test_help_and_version(capsys):
    out = _main(capsys, "--help")
    assert out.returncode == 0 and "metatrain" in out.stdout and "apply" in out.stdout
    assert _main(capsys, "--version").stdout.startswith("cmw-transfer ")


def test_inspect_names_the_provenance_method(tmp_path, capsys):
    net = make_net()
    net.provenance = {"source": "digits-pmd", "method": "cmwnet-sl", "note": "red\x1b[31m\nforged: line"}
    net.save_pretrained(tmp_path / "sl")
    out = _main(capsys, "inspect", "--weights", str(tmp_path / "sl"))
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert [line for line in lines if line.startswith("method:")] == [
        "method:         cmwnet-sl (K=3, hidden=16, format v1)"]
    assert "\x1b" not in out.stdout and not any(line.startswith("forged") for line in lines)


def test_bare_command_prints_the_help_and_unknown_command_hint(capsys):
    out = _main(capsys)
    assert out.returncode == 0 and out.stdout.startswith("Usage: cmw-transfer") and "metatrain" in out.stdout
    assert out.stderr == ""
    _assert_one_line_error(_main(capsys, "bogus"), "(see cmw-transfer --help)")
    assert "cmw-transfer cmw-transfer" not in _main(capsys, "bogus").stderr


def test_help_does_not_import_torch():
    """--help of the group and of every subcommand stays light (timed in scripts/bench_cli_help.py): the option
    tables come from torch-free modules (cli/options.py, trainer/config.py)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom cmw_transfer.cli import main\n"
             "for cmd in ([], ['inspect'], ['push'], ['data'], ['apply'], ['metatrain'], ['probe'], ['import']):\n"
             "    try:\n        main([*cmd, '--help'])\n    except SystemExit:\n        pass\n"
             "print('HEAVY', [m for m in ('torch', 'sklearn', 'huggingface_hub', 'timm') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "HEAVY []", out.stdout[-500:]
