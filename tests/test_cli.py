"""The `quark` command: `info` prints the card's figures; user errors are one line, never a traceback."""

import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "quark", *args], capture_output=True, text=True, timeout=120)


def test_info_prints_parameter_count_and_kv_cache():
    r = run("info", "--preset", "quark-72m")
    assert r.returncode == 0, r.stderr
    assert "71,646,720" in r.stdout
    assert "7,168 bytes (bf16)" in r.stdout


def test_unknown_preset_is_a_one_line_error():
    r = run("info", "--preset", "quark-1t")
    assert r.returncode == 2
    assert "unknown preset 'quark-1t'" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0 and "info" in r.stdout
