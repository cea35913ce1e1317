"""The kiln command's client verbs against a real server, as a user types them."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.models import bundled_gguf

pytestmark = pytest.mark.real_model


def kiln(server, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILN_HOST": server.host}
    env.pop("OLLAMA_HOST", None)
    r = subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, input=input, capture_output=True,
                       text=True, timeout=180)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_list_show_ps(server):
    out = kiln(server, "list").stdout
    assert out.splitlines()[0].split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert "smollm2:135m" in out
    show = kiln(server, "show", "smollm2:135m").stdout
    assert "architecture" in show and "llama" in show and "Q4_1" in show
    assert "FROM " in kiln(server, "show", "smollm2:135m", "--modelfile").stdout
    assert "<|im_start|>" in kiln(server, "show", "smollm2:135m", "--template").stdout
    kiln(server, "ps")


def test_run_one_shot_streams_an_answer(server):
    r = kiln(server, "run", "smollm2:135m", "Say hello.", "-o", "num_predict=8", "-o", "temperature=0")
    assert r.stdout.strip()


def test_run_into_a_closed_pipe_exits_quietly(server):
    """`kiln run ... | head -1`: the reader goes away mid-stream; no traceback."""
    env = {**os.environ, "KILN_HOST": server.host}
    env.pop("OLLAMA_HOST", None)
    p = subprocess.Popen([sys.executable, "-m", "server.cli", "run", "smollm2:135m", "Count from 1 to 300.",
                          "-o", "num_predict=300", "-o", "temperature=0"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.read(1)  # the answer has started
    p.stdout.close()
    _, err = p.communicate(timeout=180)
    assert p.returncode == 141, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_run_interactive_reads_stdin(server):
    r = kiln(server, "run", "smollm2:135m", "-o", "num_predict=6", input="What is 2+2?\n")
    assert r.stdout.strip()


def test_create_from_gguf_uploads_a_blob(server, tmp_path):
    gguf = tmp_path / "copy.gguf"
    shutil.copy(bundled_gguf(), gguf)
    mf = tmp_path / "Modelfile"
    mf.write_text('FROM ./copy.gguf\nPARAMETER temperature 0\nPARAMETER num_predict 8\nSYSTEM """Be brief."""\n')
    r = kiln(server, "create", "cli-made:v1", "-f", str(mf))
    assert "success" in r.stderr
    assert "cli-made:v1" in kiln(server, "list").stdout
    assert "Be brief." in kiln(server, "show", "cli-made:v1", "--modelfile").stdout
    assert kiln(server, "run", "cli-made:v1", "Hi").stdout.strip()
    kiln(server, "cp", "cli-made:v1", "cli-copy")
    kiln(server, "rm", "cli-made:v1", "cli-copy")
    assert "cli-made" not in kiln(server, "list").stdout


def test_errors_are_clear(server):
    r = kiln(server, "show", "no-such-model", check=False)
    assert r.returncode == 1 and "not found" in r.stderr
    r = kiln(server, "pull", "no-such-model", check=False)
    assert r.returncode == 1 and "Error: pull model manifest" in r.stderr and "offline" in r.stderr
    r = subprocess.run([sys.executable, "-m", "server.cli", "list"], capture_output=True, text=True,
                       env={**os.environ, "KILN_HOST": "127.0.0.1:1"})
    assert r.returncode == 1 and "could not connect" in r.stderr


def test_config_prints_sources(server):
    env = {**os.environ, "OLLAMA_KEEP_ALIVE": "7m"}
    r = subprocess.run([sys.executable, "-m", "server.cli", "config"], env=env, capture_output=True, text=True)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("keep_alive"))
    assert "7m" in line and "env OLLAMA_KEEP_ALIVE" in line
